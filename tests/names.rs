//! No agent name can reach outside the data dir; unusable names get a clear error.

mod common;

use agents::{prelude::*, testing::TestRuntime, MAX_NAME_LEN};
use common::Counter;

#[tokio::test]
async fn hostile_names_are_stored_inside_the_data_dir() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
    let names = [
        "/",
        "..",
        "../..",
        "../../etc/passwd",
        "a\0b",
        "\0",
        "con",
        "x/../../y",
        "🙂",
        " ",
    ];
    for (i, name) in names.iter().enumerate() {
        let c = rt.agent::<Counter>(name);
        assert_eq!(c.add(i as i64 + 1).await.unwrap(), i as i64 + 1, "{name:?}");
        let path = rt.database_path::<Counter>(name).unwrap();
        assert!(
            path.starts_with(rt.dir()) && path.exists(),
            "{name:?} -> {}",
            path.display()
        );
    }
    // Each name is its own agent.
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            rt.agent::<Counter>(name).get().await.unwrap(),
            i as i64 + 1,
            "{name:?}"
        );
    }
    // Nothing but the runtime's own layout was created.
    for entry in std::fs::read_dir(rt.dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name == "agents"
                || name == "spare"
                || name == "agents.lock"
                || name.starts_with("alarms.sqlite")
                || name.starts_with("catalog.sqlite"),
            "unexpected {name}"
        );
    }
}

#[tokio::test]
async fn oversize_and_empty_names_are_refused_clearly() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
    let long = "x".repeat(10 * 1024);
    let err = rt.agent::<Counter>(&long).add(1).await.unwrap_err();
    assert!(
        matches!(&err, RpcError::BadArgs(m) if m.contains("10240 bytes") && m.contains(&MAX_NAME_LEN.to_string())),
        "{err}"
    );
    assert!(rt.try_agent::<Counter>(&long).is_err());
    let err = rt.agent::<Counter>("").add(1).await.unwrap_err();
    assert!(
        matches!(&err, RpcError::BadArgs(m) if m.contains("empty")),
        "{err}"
    );
    assert!(rt.try_agent::<Counter>("ok").is_ok());
}

#[tokio::test]
async fn unregistered_classes_are_refused_clearly() {
    let rt = TestRuntime::start(Runtime::builder()).unwrap();
    let err = rt.agent::<Counter>("a").add(1).await.unwrap_err();
    assert!(
        matches!(&err, RpcError::BadArgs(m) if m.contains("no agent class `counter`")),
        "{err}"
    );
}
