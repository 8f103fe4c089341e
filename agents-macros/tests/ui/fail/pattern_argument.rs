use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable]
    pub async fn add(&mut self, _ctx: &mut Ctx<Self>, (a, b): (i64, i64)) -> i64 { a + b }
}

fn main() {}
