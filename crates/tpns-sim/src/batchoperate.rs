//! The simulator's `/v3/device/account/batchoperate` (ops 1-5), applied at once or after
//! `SimConfig::apply_delay`, as TPNS applies writes asynchronously.

use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::{json, Value};
use tpns_wire::{code, error_body, ErrorShape, BATCHOPERATE_PATH};

use super::{count, json_response, Body, Inner, SEED_TIMESTAMP};

/// One bind/unbind operation, resolved from the request.
#[derive(Debug, Clone)]
enum Change {
    Overwrite(String, Vec<(String, i64)>),
    Remove(String, Vec<(String, i64)>),
    ClearToken(String),
    ClearAccount(String, i64),
}

pub(super) fn answer(inner: &Arc<Inner>, app: &str, body: &[u8]) -> Response<Body> {
    let bad = |ret: i64, msg: &str| {
        count(inner, BATCHOPERATE_PATH, 0);
        json_response(StatusCode::OK, error_body(ErrorShape::Snake, ret, msg))
    };
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return bad(code::UNPARSEABLE, "request body cannot be parsed");
    };
    let Some(op) = v.get("operator_type").and_then(Value::as_i64) else {
        return bad(code::MISSING_PARAMETER, "operator_type missing");
    };
    let top_type = v.get("account_type").and_then(Value::as_i64).unwrap_or(0);
    let accounts_of = |list: Option<&Value>| -> Option<Vec<(String, i64)>> {
        list?
            .as_array()?
            .iter()
            .map(|a| {
                Some((
                    a.get("account")?.as_str()?.to_owned(),
                    a.get("account_type")
                        .and_then(Value::as_i64)
                        .unwrap_or(top_type),
                ))
            })
            .collect()
    };
    let mut changes = Vec::new();
    match op {
        1..=3 => {
            let Some(list) = v.get("token_accounts").and_then(Value::as_array) else {
                return bad(code::MISSING_PARAMETER, "token_accounts missing");
            };
            for ta in list {
                let (Some(token), Some(accts)) = (
                    ta.get("token").and_then(Value::as_str),
                    accounts_of(ta.get("account_list")),
                ) else {
                    return bad(code::INVALID_PARAMETER, "token_accounts element invalid");
                };
                changes.push(if op == 3 {
                    Change::Remove(token.to_owned(), accts)
                } else {
                    Change::Overwrite(token.to_owned(), accts)
                });
            }
        }
        4 => {
            let Some(list) = v.get("token_list").and_then(Value::as_array) else {
                return bad(code::MISSING_PARAMETER, "token_list missing");
            };
            for t in list {
                let Some(t) = t.as_str() else {
                    return bad(code::INVALID_PARAMETER, "token_list element invalid");
                };
                changes.push(Change::ClearToken(t.to_owned()));
            }
        }
        5 => {
            let Some(accts) = accounts_of(v.get("account_list")) else {
                return bad(code::MISSING_PARAMETER, "account_list missing or invalid");
            };
            for (a, t) in accts {
                changes.push(Change::ClearAccount(a, t));
            }
        }
        _ => return bad(code::INVALID_PARAMETER, "operator_type must be 1 to 5"),
    }
    count(inner, BATCHOPERATE_PATH, changes.len() as u64);
    let n = changes.len();
    let delay = inner.config.apply_delay;
    let apply = {
        let inner = inner.clone();
        let app = app.to_owned();
        move || {
            let mut data = inner.data.write();
            let b = data.entry(app).or_default();
            for c in changes {
                match c {
                    Change::Overwrite(token, accts) => {
                        b.clear_token(&token);
                        for (a, t) in accts {
                            b.bind(&token, &a, t, SEED_TIMESTAMP);
                        }
                    }
                    Change::Remove(token, accts) => {
                        for (a, t) in accts {
                            b.unbind(&token, &a, t);
                        }
                    }
                    Change::ClearToken(token) => b.clear_token(&token),
                    Change::ClearAccount(a, t) => b.clear_account(&a, t),
                }
            }
        }
    };
    if delay.is_zero() {
        apply();
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            apply();
        });
    }
    json_response(
        StatusCode::OK,
        json!({"ret_code": 0, "err_msg": "NO_ERROR", "result": vec!["0"; n]}).to_string(),
    )
}
