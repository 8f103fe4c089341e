use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

impl A {
    #[schedule(every = "1m")]
    async fn purge(&mut self, _ctx: &mut Ctx<Self>) {}
}

fn main() {}
