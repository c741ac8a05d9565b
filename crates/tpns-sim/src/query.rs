//! The simulator's `/v3/device/account/query`: its own reading of the request (not the proxy's
//! parser, so a bug there is not mirrored here) and the documented answer.

use http::{Response, StatusCode};
use serde_json::{json, Value};
use tpns_wire::{code, error_body, ErrorShape, QUERY_PATH};

use super::store::AppBindings;
use super::{count, json_response, Body, Inner, RECENT_QUERIES};

/// One identifier of a query, as the simulator reads it.
enum Asked {
    /// An account, with its own `account_type` if it has one.
    Account(String, Option<i64>),
    Token(String),
}

/// A query as the simulator reads it.
struct Query {
    /// `operator_type` 1 (accounts asked) rather than 2 (tokens asked).
    accounts: bool,
    /// The top-level `account_type`.
    top_type: Option<i64>,
    asked: Vec<Asked>,
}

/// Parses a query; refusals carry a TPNS code and a message.
fn parse_query(body: &[u8], max_items: usize) -> Result<Query, (i64, String)> {
    let invalid = |m: &str| (code::INVALID_PARAMETER, m.to_owned());
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        (
            code::UNPARSEABLE,
            format!("request body cannot be parsed: {e}"),
        )
    })?;
    let obj = v
        .as_object()
        .ok_or((code::UNPARSEABLE, "not a JSON object".to_owned()))?;
    let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let op = present("operator_type")
        .ok_or((code::MISSING_PARAMETER, "operator_type missing".to_owned()))?;
    let accounts = match op.as_i64() {
        Some(1) => true,
        Some(2) => false,
        _ => return Err(invalid("operator_type must be 1 or 2")),
    };
    let account_type = |v: &Value| v.as_i64().filter(|t| *t >= 0);
    let top_type = match obj.get("account_type") {
        None => None,
        Some(t) => Some(account_type(t).ok_or(invalid("account_type must be an integer"))?),
    };
    let field = if accounts {
        "account_list"
    } else {
        "token_list"
    };
    let list = present(field)
        .ok_or((code::MISSING_PARAMETER, format!("{field} missing")))?
        .as_array()
        .ok_or(invalid("the list must be an array"))?;
    if list.is_empty() || list.len() > max_items {
        return Err(invalid("the list is empty or too long"));
    }
    let mut asked = Vec::with_capacity(list.len());
    for el in list {
        asked.push(if accounts {
            let name = el
                .get("account")
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
                .ok_or(invalid("an account element needs an account"))?;
            let t = match el.get("account_type") {
                None => None,
                Some(t) => Some(account_type(t).ok_or(invalid("account_type must be an integer"))?),
            };
            Asked::Account(name.to_owned(), t)
        } else {
            let token = el
                .as_str()
                .filter(|t| !t.is_empty())
                .ok_or(invalid("a token must be a non-empty string"))?;
            Asked::Token(token.to_owned())
        });
    }
    Ok(Query {
        accounts,
        top_type,
        asked,
    })
}

pub(super) fn answer(inner: &Inner, app: &str, body: &[u8]) -> Response<Body> {
    let Query {
        accounts,
        top_type,
        asked,
    } = match parse_query(body, inner.config.max_items) {
        Ok(q) => q,
        Err((ret, msg)) => {
            count(inner, QUERY_PATH, 0);
            return json_response(StatusCode::OK, error_body(ErrorShape::Camel, ret, &msg));
        }
    };
    {
        let mut s = inner.stats.lock();
        *s.requests.entry(QUERY_PATH.to_owned()).or_default() += 1;
        *s.identifiers.entry(QUERY_PATH.to_owned()).or_default() += asked.len() as u64;
        if s.recent_queries.len() == RECENT_QUERIES {
            s.recent_queries.pop_front();
        }
        s.recent_queries.push_back(
            asked
                .iter()
                .map(|a| match a {
                    Asked::Account(name, _) | Asked::Token(name) => name.clone(),
                })
                .collect(),
        );
    }
    let data = inner.data.read();
    let empty = AppBindings::default();
    let b = data.get(app).unwrap_or(&empty);
    let mut codes: Vec<&str> = Vec::with_capacity(asked.len());
    let mut elements: Vec<Value> = Vec::new();
    for a in &asked {
        match a {
            Asked::Account(account, account_type) => {
                let t = account_type.or(top_type).unwrap_or(0);
                let tokens = b.tokens_of(account, t);
                if tokens.is_empty() {
                    codes.push(code::ELEMENT_NOT_FOUND);
                } else {
                    codes.push(code::ELEMENT_OK);
                    elements
                        .push(json!({"account": account, "account_type": t, "token_list": tokens}));
                }
            }
            Asked::Token(token) => {
                let accounts = b.accounts_of(token);
                if !accounts.is_empty() {
                    codes.push(code::ELEMENT_OK);
                    let list: Vec<Value> = accounts
                        .iter()
                        .map(|a| json!({"account": a.account, "account_type": a.account_type, "timestamp": a.timestamp}))
                        .collect();
                    elements.push(json!({"token": token, "account_list": list}));
                } else if b.is_registered(token) {
                    codes.push(code::ELEMENT_NOT_FOUND);
                } else {
                    codes.push(code::ELEMENT_INVALID_TOKEN);
                }
            }
        }
    }
    let failed = codes.iter().filter(|c| **c != code::ELEMENT_OK).count();
    let ret = match failed {
        0 => code::OK,
        n if n == codes.len() => inner.config.all_failed_ret_code,
        _ => inner.config.partial_failure_ret_code,
    };
    let (at, ta) = if accounts {
        (Value::Array(elements), Value::Null)
    } else {
        (Value::Null, Value::Array(elements))
    };
    json_response(
        StatusCode::OK,
        json!({"retCode": ret, "errMsg": code::message(ret), "result": codes,
               "account_tokens": at, "token_accounts": ta})
        .to_string(),
    )
}
