use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable]
    pub async fn add(&mut self, by: i64, _ctx: &mut Ctx<Self>) -> i64 { by }
}

fn main() {}
