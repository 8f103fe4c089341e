//! The agent's state, connection state and event types, and the typed client that uses them.
use agents::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Topic(String);

#[derive(Debug, Serialize, Deserialize)]
pub enum Said {
    Text(String),
}

#[derive(Default)]
pub struct Room;

impl Agent for Room {
    async fn on_connect(&mut self, _ctx: &mut Ctx<Self>, conn: &Conn<Self>) -> Result<(), AppError> {
        conn.set_state(&7u32)?;
        Ok(())
    }
}

#[agent(state = "Topic", conn_state = "u32", event = "Said")]
impl Room {
    #[callable]
    pub async fn say(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<(), AppError> {
        ctx.broadcast(&Said::Text(text), &[])?;
        ctx.set_state(&Topic("t".into()))?;
        Ok(())
    }
}

async fn use_client(client: RoomClient) {
    let _: Option<Topic> = client.state();
    let mut events = client.events();
    let _: Option<Result<Said, agents::client::StreamError>> = events.next().await;
}

fn main() {
    let _ = use_client;
}
