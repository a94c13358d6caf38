//! `highwater hash-secret`: make the `secretHash` of a credentials entry.
//! Reads a password from standard input and prints its Argon2id hash, or
//! makes a new random API token and prints it with its hash. Secrets never
//! appear in logs, and a password is never taken from the command line,
//! where other users could see it.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;

use crate::auth;
use crate::config::HashSecretArgs;

pub fn run(args: HashSecretArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if args.new_token {
        let token = auth::new_token().map_err(anyhow::Error::msg).context("cannot make a random token")?;
        writeln!(out, "token:      {token}")?;
        writeln!(out, "secretHash: {}", auth::hash_token(&token))?;
        return Ok(());
    }
    if std::io::stdin().is_terminal() {
        eprintln!("password (then Enter):");
    }
    let mut password = String::new();
    std::io::stdin().lock().read_line(&mut password).context("cannot read the password from standard input")?;
    let password = password.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    let hash = auth::hash_password(password).map_err(anyhow::Error::msg).context("cannot hash the password")?;
    writeln!(out, "{hash}")?;
    Ok(())
}
