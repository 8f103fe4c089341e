use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[schedule(every = "1m", tz = "Europe/Paris")]
    async fn purge(&mut self, _ctx: &mut Ctx<Self>) {}
}

fn main() {}
