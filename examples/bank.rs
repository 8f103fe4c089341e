//! Transfers between accounts held by one agent: money is never lost or created, whatever
//! fails. `cargo run --example bank`
//!
//! A transfer debits first and checks afterwards: when the check fails the handler returns
//! `Err`, and the runtime rolls the debit back. No hand-written compensation, no races: the
//! agent is the single writer of its accounts.

use agents::prelude::*;
use serde::{Deserialize, Serialize};

/// A branch: a set of accounts in one SQLite database.
#[derive(Default)]
pub struct Bank;

/// Why a bank operation was refused. Reaches the caller typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum BankError {
    /// The source account cannot cover the amount.
    #[error("insufficient funds in {account}: balance {balance}, needed {needed}")]
    InsufficientFunds {
        account: String,
        balance: i64,
        needed: i64,
    },
    /// No such account.
    #[error("no account named {0}")]
    NoAccount(String),
    /// Amounts are positive.
    #[error("invalid amount {0}")]
    InvalidAmount(i64),
    /// The database refused.
    #[error("storage: {0}")]
    Storage(String),
}

impl From<agents::Error> for BankError {
    fn from(e: agents::Error) -> Self {
        BankError::Storage(e.to_string())
    }
}

impl Agent for Bank {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&["CREATE TABLE accounts(name TEXT PRIMARY KEY, balance INTEGER NOT NULL)"])?;
        Ok(())
    }
}

fn storage(e: impl std::fmt::Display) -> BankError {
    BankError::Storage(e.to_string())
}

/// Adds `delta` to `account`; returns the new balance.
fn apply(ctx: &Ctx<Bank>, account: &str, delta: i64) -> Result<i64, BankError> {
    let mut stmt = ctx
        .sql()
        .prepare_cached(
            "UPDATE accounts SET balance = balance + ?2 WHERE name = ?1 RETURNING balance",
        )
        .map_err(storage)?;
    let mut rows = stmt.query((account, delta)).map_err(storage)?;
    match rows.next().map_err(storage)? {
        Some(row) => row.get(0).map_err(storage),
        None => Err(BankError::NoAccount(account.to_owned())),
    }
}

#[agent]
impl Bank {
    /// Opens `account` with `deposit` (or adds to it if it exists); returns the balance.
    #[callable]
    pub async fn deposit(
        &mut self,
        ctx: &mut Ctx<Self>,
        account: String,
        amount: i64,
    ) -> Result<i64, BankError> {
        if amount <= 0 {
            return Err(BankError::InvalidAmount(amount));
        }
        ctx.sql()
            .execute(
                "INSERT OR IGNORE INTO accounts(name, balance) VALUES (?1, 0)",
                [&account],
            )
            .map_err(storage)?;
        apply(ctx, &account, amount)
    }

    /// Moves `amount` from `from` to `to`.
    #[callable]
    pub async fn transfer(
        &mut self,
        ctx: &mut Ctx<Self>,
        from: String,
        to: String,
        amount: i64,
    ) -> Result<(), BankError> {
        if amount <= 0 {
            return Err(BankError::InvalidAmount(amount));
        }
        let balance = apply(ctx, &from, -amount)?;
        apply(ctx, &to, amount)?; // an unknown `to` fails here, after the debit: rolled back
        if balance < 0 {
            return Err(BankError::InsufficientFunds {
                account: from,
                balance: balance + amount,
                needed: amount,
            });
        }
        Ok(())
    }

    /// A buggy transfer that crashes between the debit and the credit. The runtime rolls the
    /// debit back: the panic costs nothing but the call.
    #[callable]
    pub async fn transfer_with_bug(
        &mut self,
        ctx: &mut Ctx<Self>,
        from: String,
        to: String,
        amount: i64,
    ) -> Result<(), BankError> {
        apply(ctx, &from, -amount)?;
        panic!("bug between debit and credit of {amount} from {from} to {to}");
    }

    /// The balance of `account`.
    #[callable]
    pub async fn balance(
        &mut self,
        ctx: &mut Ctx<Self>,
        account: String,
    ) -> Result<i64, BankError> {
        apply(ctx, &account, 0)
    }

    /// The sum of every balance.
    #[callable]
    pub async fn total(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, BankError> {
        ctx.sql()
            .query_row("SELECT coalesce(sum(balance), 0) FROM accounts", [], |r| {
                r.get(0)
            })
            .map_err(storage)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::builder()
        .data_dir(dir.path())
        .agent::<Bank>()
        .build()?;
    let bank = runtime.agent::<Bank>("main-street");
    bank.deposit("alice".into(), 100).await?;
    bank.deposit("bob".into(), 50).await?;
    bank.transfer("alice".into(), "bob".into(), 30).await?;
    println!(
        "alice 100 -> 30 -> bob: alice {}, bob {}",
        bank.balance("alice".into()).await?,
        bank.balance("bob".into()).await?
    );
    match bank.transfer("bob".into(), "alice".into(), 1_000).await {
        Err(RpcError::App(e)) => println!("refused: {e}"),
        other => println!("unexpected: {other:?}"),
    }
    match bank
        .transfer_with_bug("alice".into(), "bob".into(), 10)
        .await
    {
        Err(e) => println!("a crashing transfer failed: {e}"),
        Ok(()) => println!("unexpected success"),
    }
    println!("total is still {}", bank.total().await?);
    runtime.shutdown().await;
    Ok(())
}
