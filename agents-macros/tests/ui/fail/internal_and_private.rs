use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable(internal, private)]
    pub async fn both(&mut self, _ctx: &mut Ctx<Self>) {}
}

fn main() {}
