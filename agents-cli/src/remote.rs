//! The commands on a running server: `call` and `tail`, over a WebSocket with the JSON codec.

use std::sync::Arc;

use agents_client::{ClientCore, Codec, ConnectOptions, RpcError, WsTransport};
use serde_json::Value;

use crate::Failed;

/// The WebSocket URL of `class`/`name` on the server at `base` (`http://`, `https://`, `ws://`
/// or `wss://`, with or without a trailing slash).
fn agent_url(base: &str, (class, name): (&str, &str)) -> Result<String, Failed> {
    let base = base.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_owned()
    } else {
        return Err(format!(
            "`{base}` is not a server's URL (http://HOST:PORT, say)"
        ));
    };
    Ok(format!("{base}/agents/{}/{}", escape(class), escape(name)))
}

/// `segment` as one path segment: every byte but the unreserved ones percent-encoded.
fn escape(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// A current-thread tokio runtime for one command.
fn tokio() -> Result<tokio::runtime::Runtime, Failed> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))
}

async fn connect(url: &str) -> Result<ClientCore, Failed> {
    let options = ConnectOptions::new().codec(Codec::Json);
    let transport = WsTransport::connect_with(url, options)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ClientCore::new(Arc::new(transport)))
}

/// `agents call URL CLASS/NAME METHOD [ARGS]`: prints the reply as JSON; an error reply is
/// printed to stderr with its kind, and fails.
pub fn call(base: &str, agent: (&str, &str), method: &str, args: &str) -> Result<(), Failed> {
    let url = agent_url(base, agent)?;
    let args: Value = serde_json::from_str(args).map_err(|e| {
        format!("the arguments are not JSON ({e}): give a JSON array, as in '[1, \"two\"]'")
    })?;
    if !args.is_array() {
        return Err(format!(
            "the arguments must be a JSON array, one element per parameter, not {args}"
        ));
    }
    // The client names methods by `&'static str` (generated clients' names are constants).
    let method: &'static str = Box::leak(method.to_owned().into_boxed_str());
    tokio()?.block_on(async {
        let client = connect(&url).await?;
        let reply: Result<Value, RpcError<Value>> = client.call(method, args).await;
        match reply {
            Ok(value) => {
                println!("{value}");
                Ok(())
            }
            Err(RpcError::App(error)) => Err(format!("the method failed: {error}")),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// `agents tail URL CLASS/NAME`: prints each event the agent broadcasts, one JSON line each,
/// until the server goes for good or the user stops it (Ctrl-C).
pub fn tail(base: &str, agent: (&str, &str)) -> Result<(), Failed> {
    let url = agent_url(base, agent)?;
    tokio()?.block_on(async {
        let client = connect(&url).await?;
        eprintln!("(listening to {}/{}; Ctrl-C stops)", agent.0, agent.1);
        let mut events = client.events::<Value>();
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => println!("{event}"),
                    Some(Err(e)) => eprintln!("({e})"),
                    None => return Err("the connection ended".to_owned()),
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}
