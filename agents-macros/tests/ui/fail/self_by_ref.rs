use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable]
    pub async fn add(&self, _ctx: &mut Ctx<Self>, by: i64) -> i64 { by }
}

fn main() {}
