//! Secrets (SecretKeys, the admin token): read from files (a mounted Kubernetes Secret) or
//! environment variables, never from the TOML; never printed; compared in constant time.

use std::path::Path;

use super::{AuthScheme, Config};

/// A secret value: never printed by `Debug`, compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Constant-time equality with `other`.
    pub fn matches(&self, other: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == other.len() && bool::from(self.0.as_bytes().ct_eq(other))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Reads a secret from a file or an environment variable; the message names `key` on failure
/// (never the value).
pub fn read_secret(
    key: &str,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<Secret>, String> {
    let value = match (file, env) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| format!("{key}_file: cannot read {}: {e}", path.display()))?,
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| format!("{key}_env: environment variable {var} is not set"))?,
        (None, None) => return Ok(None),
    };
    let value = value.trim().to_owned();
    if value.is_empty() {
        return Err(format!("{key}: the secret is empty"));
    }
    Ok(Some(Secret(value)))
}

/// The secrets the proxy holds, read from their files or environment variables.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// AccessID → SecretKey, for verifying and re-signing signed requests.
    pub apps: std::collections::HashMap<String, Secret>,
    /// The injected credentials, if configured.
    pub inject: Option<Injected>,
}

#[derive(Debug, Clone)]
pub struct Injected {
    pub access_id: String,
    pub secret: Secret,
    pub scheme: AuthScheme,
}

impl Config {
    /// Reads every configured app key and the injected credentials.
    pub fn keys(&self) -> Result<Keys, Vec<String>> {
        let mut problems = Vec::new();
        let mut keys = Keys::default();
        for (i, app) in self.auth.apps.iter().enumerate() {
            let key = format!("auth.apps[{i}].secret_key");
            if app.access_id.is_empty() {
                problems.push(format!("auth.apps[{i}].access_id: must not be empty"));
            }
            match read_secret(
                &key,
                app.secret_key_file.as_deref(),
                app.secret_key_env.as_deref(),
            ) {
                Ok(Some(s)) => {
                    if keys.apps.insert(app.access_id.clone(), s).is_some() {
                        problems.push(format!(
                            "auth.apps[{i}].access_id: {} is listed twice",
                            app.access_id
                        ));
                    }
                }
                Ok(None) => problems.push(format!("{key}_file or {key}_env: one must be set")),
                Err(e) => problems.push(e),
            }
        }
        if let Some(inj) = &self.auth.inject {
            if inj.access_id.is_empty() || inj.access_id.contains(':') {
                problems
                    .push("auth.inject.access_id: must be non-empty and without ':'".to_owned());
            }
            let key = "auth.inject.secret_key";
            match read_secret(
                key,
                inj.secret_key_file.as_deref(),
                inj.secret_key_env.as_deref(),
            ) {
                Ok(Some(secret)) => {
                    keys.inject = Some(Injected {
                        access_id: inj.access_id.clone(),
                        secret,
                        scheme: inj.scheme,
                    })
                }
                Ok(None) => problems.push(format!("{key}_file or {key}_env: one must be set")),
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(keys)
        } else {
            Err(problems)
        }
    }

    /// The admin bearer token, if configured.
    pub fn admin_token(&self) -> Result<Option<Secret>, String> {
        read_secret(
            "admin.token",
            self.admin.token_file.as_deref(),
            self.admin.token_env.as_deref(),
        )
    }
}
