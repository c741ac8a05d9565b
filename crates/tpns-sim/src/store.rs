//! The simulator's in-memory binding store: per app, a set of (token, account, account_type)
//! bindings indexed both ways, plus the set of registered tokens.

use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub account: String,
    pub account_type: i64,
    pub timestamp: i64,
}

#[derive(Debug, Default)]
pub struct AppBindings {
    token_accounts: HashMap<String, Vec<Binding>>,
    account_tokens: HashMap<(String, i64), Vec<String>>,
    registered: HashSet<String>,
}

impl AppBindings {
    pub fn register(&mut self, token: &str) {
        self.registered.insert(token.to_owned());
    }

    pub fn is_registered(&self, token: &str) -> bool {
        self.registered.contains(token)
    }

    pub fn bind(&mut self, token: &str, account: &str, account_type: i64, timestamp: i64) {
        self.register(token);
        let list = self.token_accounts.entry(token.to_owned()).or_default();
        if list
            .iter()
            .any(|b| b.account == account && b.account_type == account_type)
        {
            return;
        }
        list.push(Binding {
            account: account.to_owned(),
            account_type,
            timestamp,
        });
        self.account_tokens
            .entry((account.to_owned(), account_type))
            .or_default()
            .push(token.to_owned());
    }

    pub fn unbind(&mut self, token: &str, account: &str, account_type: i64) {
        if let Some(list) = self.token_accounts.get_mut(token) {
            list.retain(|b| !(b.account == account && b.account_type == account_type));
            if list.is_empty() {
                self.token_accounts.remove(token);
            }
        }
        let key = (account.to_owned(), account_type);
        if let Some(tokens) = self.account_tokens.get_mut(&key) {
            tokens.retain(|t| t != token);
            if tokens.is_empty() {
                self.account_tokens.remove(&key);
            }
        }
    }

    /// Removes every account bound to `token`.
    pub fn clear_token(&mut self, token: &str) {
        let bound: Vec<Binding> = self.token_accounts.get(token).cloned().unwrap_or_default();
        for b in bound {
            self.unbind(token, &b.account, b.account_type);
        }
    }

    /// Removes `account` from every token.
    pub fn clear_account(&mut self, account: &str, account_type: i64) {
        let tokens = self
            .account_tokens
            .get(&(account.to_owned(), account_type))
            .cloned()
            .unwrap_or_default();
        for t in tokens {
            self.unbind(&t, account, account_type);
        }
    }

    pub fn tokens_of(&self, account: &str, account_type: i64) -> &[String] {
        self.account_tokens
            .get(&(account.to_owned(), account_type))
            .map_or(&[], Vec::as_slice)
    }

    pub fn accounts_of(&self, token: &str) -> &[Binding] {
        self.token_accounts.get(token).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions_stay_consistent() {
        let mut s = AppBindings::default();
        s.bind("t1", "a", 0, 1);
        s.bind("t2", "a", 0, 1);
        s.bind("t1", "b", 1, 1);
        s.bind("t1", "b", 1, 2);
        assert_eq!(s.tokens_of("a", 0), ["t1", "t2"]);
        assert_eq!(s.accounts_of("t1").len(), 2);
        s.clear_token("t1");
        assert_eq!(s.tokens_of("a", 0), ["t2"]);
        assert!(s.tokens_of("b", 1).is_empty());
        assert!(s.is_registered("t1"));
        s.clear_account("a", 0);
        assert!(s.accounts_of("t2").is_empty());
    }
}
