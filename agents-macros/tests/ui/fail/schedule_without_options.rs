use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[schedule]
    async fn purge(&mut self, _ctx: &mut Ctx<Self>) {}
}

fn main() {}
