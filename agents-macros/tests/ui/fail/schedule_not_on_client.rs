use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[schedule(every = "1m")]
    async fn purge(&mut self, _ctx: &mut Ctx<Self>) {}
}

fn not_a_client_method(c: AClient) {
    let _ = c.purge();
}

fn main() {}
