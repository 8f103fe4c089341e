//! The bank example under concurrent transfers that fail in every way: money is conserved.

#[path = "../examples/bank.rs"]
#[allow(dead_code)]
mod bank;

use agents::{prelude::*, testing::TestRuntime};
use bank::{Bank, BankError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_is_never_lost_or_created() {
    let mut rt = TestRuntime::start(Runtime::builder().agent::<Bank>()).unwrap();
    let b = rt.agent::<Bank>("branch");
    let accounts = ["a", "b", "c", "d"];
    for a in accounts {
        b.deposit(a.into(), 1_000).await.unwrap();
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let tasks: Vec<_> = (0..2_000)
        .map(|_| {
            let (r, from, to, amount) = (
                next() % 20,
                next() as usize % 4,
                next() as usize % 5,
                (next() % 400) as i64,
            );
            let b = b.clone();
            tokio::spawn(async move {
                let to = if to == 4 {
                    "nobody".to_string()
                } else {
                    accounts[to].to_string()
                };
                let from = accounts[from].to_string();
                if r == 0 {
                    b.transfer_with_bug(from, to, amount + 1)
                        .await
                        .map_err(|e| e.kind())
                } else {
                    b.transfer(from, to, amount).await.map_err(|e| e.kind())
                }
            })
        })
        .collect();
    let (mut ok, mut refused, mut crashed) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(agents::ErrorKind::App) => refused += 1,
            Err(agents::ErrorKind::Internal) => crashed += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(
        ok > 0 && refused > 0 && crashed > 0,
        "ok {ok} refused {refused} crashed {crashed}"
    );
    assert_eq!(b.total().await.unwrap(), 4_000);
    for a in accounts {
        assert!(b.balance(a.into()).await.unwrap() >= 0);
    }
    let err = b
        .transfer("a".into(), "b".into(), 1_000_000)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RpcError::App(BankError::InsufficientFunds {
                needed: 1_000_000,
                ..
            })
        ),
        "{err:?}"
    );

    rt.restart().await.unwrap();
    assert_eq!(rt.agent::<Bank>("branch").total().await.unwrap(), 4_000);
}
