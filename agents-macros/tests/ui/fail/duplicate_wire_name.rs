use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable]
    pub async fn add(&mut self, _ctx: &mut Ctx<Self>) -> i64 { 1 }
    #[callable(name = "add")]
    pub async fn add_v2(&mut self, _ctx: &mut Ctx<Self>) -> i64 { 2 }
}

fn main() {}
