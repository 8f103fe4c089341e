use agents::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("nope")]
pub struct Nope;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Topic(String);

/// An API declared apart from its agent.
#[agents::interface(state = "Topic", event = "String")]
pub trait RoomApi {
    /// Posts.
    async fn post(&self, text: String) -> Result<u64, Nope>;
    async fn topic(&self) -> Option<String>;
    async fn clear(&self);
}

#[derive(Default)]
pub struct Room;
impl Agent for Room {}

#[agent]
impl RoomApi for Room {
    async fn post(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<u64, Nope> {
        ctx.broadcast(&text, &[]).map_err(|_| Nope)?;
        Ok(1)
    }
    async fn topic(&mut self, ctx: &mut Ctx<Self>) -> Option<String> {
        ctx.state().ok().flatten().map(|t: Topic| t.0)
    }
    async fn clear(&mut self, _ctx: &mut Ctx<Self>) {}
}

fn main() {
    fn client_of<A: agents::AgentClass<Client = RoomApiClient>>() {}
    client_of::<Room>();
    let _ = Room::calls().post("x".into());
}
