//! Credentials and roles. Knows nothing of HTTP: `api::auth` turns headers
//! into the [`Credentials`] checked here.
//!
//! Roles follow Airbyte's: a **reader** reads (state, type, history, diff,
//! one stream); an **editor** also makes the writes a person makes (safe
//! writes, restore, reset, per-stream writes); an **admin** (Airbyte's
//! dataplane) may do everything, including the plain `create_or_update` a
//! sync uses and the lease operations.
//!
//! Secrets are stored hashed: passwords as Argon2id PHC strings, API tokens
//! as `sha256:<hex>` (tokens are random, so a fast hash is enough, and a
//! bearer token names no user, so it must be found by its hash). Every
//! comparison of secrets is constant-time.
//!
//! The credentials file (JSON):
//! ```json
//! {"credentials": [
//!   {"name": "airbyte", "role": "admin",  "secretHash": "$argon2id$v=19$m=19456,t=2,p=1$…"},
//!   {"name": "pyairbyte", "role": "editor", "secretHash": "sha256:9f86d0…"}
//! ]}
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Editor,
    Admin,
}

impl Role {
    /// The role's name in configuration and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::Editor => "editor",
            Self::Admin => "admin",
        }
    }
}

/// Who a request comes from, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

/// What a request presents.
pub enum Credentials<'a> {
    Basic { user: &'a str, password: &'a str },
    Bearer(&'a str),
}

/// Why a request is not authenticated. Never carries the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("wrong password for user {0:?}")]
    WrongPassword(String),
    #[error("unknown bearer token")]
    UnknownToken,
}

/// Why a credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the credentials are not valid JSON of the documented form: {0}")]
    Syntax(String),
    #[error("credential {name:?}: {problem}")]
    Entry { name: String, problem: String },
    #[error("no credentials are defined")]
    Empty,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    credentials: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    name: String,
    role: Role,
    secret_hash: String,
}

enum Secret {
    Argon2(String),
    Sha256([u8; 32]),
}

struct Credential {
    name: String,
    role: Role,
    secret: Secret,
}

/// The configured credentials.
pub struct Authenticator {
    credentials: Vec<Credential>,
    /// SHA-256 of `user:password` pairs already verified against an Argon2
    /// hash, so a client sending Basic on every request pays for Argon2
    /// once, not per request.
    verified: Mutex<HashMap<[u8; 32], usize>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.credentials.iter().map(|c| c.name.as_str()).collect();
        f.debug_struct("Authenticator").field("credentials", &names).finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Parses the credentials JSON.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let file: File = serde_json::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        if file.credentials.is_empty() {
            return Err(ConfigError::Empty);
        }
        let mut credentials = Vec::with_capacity(file.credentials.len());
        for entry in file.credentials {
            let bad = |problem: &str| ConfigError::Entry { name: entry.name.clone(), problem: problem.to_owned() };
            if entry.name.is_empty() || entry.name.contains(':') {
                return Err(bad("a name must be non-empty and contain no ':'"));
            }
            if credentials.iter().any(|c: &Credential| c.name == entry.name) {
                return Err(bad("the name is defined twice"));
            }
            let secret = if let Some(hex) = entry.secret_hash.strip_prefix("sha256:") {
                Secret::Sha256(decode_hex(hex).ok_or_else(|| bad("sha256: must be followed by 64 hex digits"))?)
            } else if PasswordHash::new(&entry.secret_hash).is_ok() && entry.secret_hash.starts_with("$argon2") {
                Secret::Argon2(entry.secret_hash)
            } else {
                return Err(bad(
                    "secretHash must be an Argon2 PHC string or sha256:<hex> (see `highwater hash-secret`)",
                ));
            };
            credentials.push(Credential { name: entry.name, role: entry.role, secret });
        }
        Ok(Self { credentials, verified: Mutex::new(HashMap::new()) })
    }

    /// Checks presented credentials.
    pub fn authenticate(&self, presented: &Credentials<'_>) -> Result<Identity, AuthError> {
        match presented {
            Credentials::Basic { user, password } => self.basic(user, password),
            Credentials::Bearer(token) => {
                let digest = sha256(token.as_bytes());
                // Look at every token so the time taken says nothing.
                let mut found = None;
                for (index, credential) in self.credentials.iter().enumerate() {
                    if let Secret::Sha256(hash) = &credential.secret {
                        if bool::from(hash.ct_eq(&digest)) {
                            found = Some(index);
                        }
                    }
                }
                found.map(|index| self.identity(index)).ok_or(AuthError::UnknownToken)
            }
        }
    }

    fn basic(&self, user: &str, password: &str) -> Result<Identity, AuthError> {
        let index = self
            .credentials
            .iter()
            .position(|c| c.name == user)
            .ok_or_else(|| AuthError::UnknownUser(user.to_owned()))?;
        let wrong = || AuthError::WrongPassword(user.to_owned());
        match &self.credentials[index].secret {
            Secret::Sha256(hash) => {
                if bool::from(hash.ct_eq(&sha256(password.as_bytes()))) {
                    Ok(self.identity(index))
                } else {
                    Err(wrong())
                }
            }
            Secret::Argon2(phc) => {
                let key = sha256(format!("{user}:{password}").as_bytes());
                if self.verified.lock().map(|v| v.get(&key) == Some(&index)).unwrap_or(false) {
                    return Ok(self.identity(index));
                }
                let parsed = PasswordHash::new(phc).map_err(|_| wrong())?;
                Argon2::default().verify_password(password.as_bytes(), &parsed).map_err(|_| wrong())?;
                if let Ok(mut verified) = self.verified.lock() {
                    // Bounded: only successful logins are cached.
                    if verified.len() < 10_000 {
                        verified.insert(key, index);
                    }
                }
                Ok(self.identity(index))
            }
        }
    }

    fn identity(&self, index: usize) -> Identity {
        let credential = &self.credentials[index];
        Identity { name: credential.name.clone(), role: credential.role }
    }
}

/// Hashes a password for the credentials file (Argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Hashes an API token for the credentials file.
pub fn hash_token(token: &str) -> String {
    let hex: String = sha256(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A new random API token (256 bits, hex).
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn decode_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator() -> Authenticator {
        let password = hash_password("s3cret").unwrap();
        let json = format!(
            r#"{{"credentials":[
                {{"name":"airbyte","role":"admin","secretHash":"{password}"}},
                {{"name":"ui","role":"editor","secretHash":"{}"}},
                {{"name":"bot","role":"reader","secretHash":"{}"}}]}}"#,
            hash_token("ui-password"),
            hash_token("reader-token")
        );
        Authenticator::from_json(&json).unwrap()
    }

    #[test]
    fn basic_credentials_are_checked_against_argon2_and_sha256_hashes() {
        let auth = authenticator();
        let ok = auth.authenticate(&Credentials::Basic { user: "airbyte", password: "s3cret" }).unwrap();
        assert_eq!(ok, Identity { name: "airbyte".to_owned(), role: Role::Admin });
        // A second time comes from the cache and still checks the password.
        assert!(auth.authenticate(&Credentials::Basic { user: "airbyte", password: "s3cret" }).is_ok());
        assert_eq!(
            auth.authenticate(&Credentials::Basic { user: "airbyte", password: "nope" }),
            Err(AuthError::WrongPassword("airbyte".to_owned()))
        );
        let ui = auth.authenticate(&Credentials::Basic { user: "ui", password: "ui-password" }).unwrap();
        assert_eq!(ui.role, Role::Editor);
    }

    #[test]
    fn bearer_tokens_are_found_by_their_hash() {
        let auth = authenticator();
        assert_eq!(auth.authenticate(&Credentials::Bearer("reader-token")).unwrap().name, "bot");
        assert_eq!(auth.authenticate(&Credentials::Bearer("other")), Err(AuthError::UnknownToken));
    }

    #[test]
    fn errors_never_contain_the_secret() {
        let auth = authenticator();
        let error = auth.authenticate(&Credentials::Basic { user: "airbyte", password: "hunter2" }).unwrap_err();
        assert!(!error.to_string().contains("hunter2"));
    }

    #[test]
    fn roles_are_ordered_by_what_they_allow() {
        assert!(Role::Reader < Role::Editor && Role::Editor < Role::Admin);
    }

    #[test]
    fn bad_credential_files_are_refused_with_the_entry_named() {
        let plain = r#"{"credentials":[{"name":"x","role":"admin","secretHash":"plaintext"}]}"#;
        assert!(matches!(Authenticator::from_json(plain), Err(ConfigError::Entry { .. })));
        let role = r#"{"credentials":[{"name":"x","role":"root","secretHash":"sha256:00"}]}"#;
        assert!(matches!(Authenticator::from_json(role), Err(ConfigError::Syntax(_))));
        assert!(matches!(Authenticator::from_json(r#"{"credentials":[]}"#), Err(ConfigError::Empty)));
    }
}
