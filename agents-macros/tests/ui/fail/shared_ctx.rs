use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable]
    pub async fn add(&mut self, _ctx: &Ctx<Self>, by: i64) -> i64 { by }
}

fn main() {}
