use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent(internal = "yes")]
impl A {
    #[callable(internal = true)]
    pub async fn add(&mut self, _ctx: &mut Ctx<Self>) -> i64 { 1 }
}

#[derive(Default)]
pub struct B;
impl Agent for B {}

#[agent]
impl B {
    #[callable(internal = true)]
    pub async fn add(&mut self, _ctx: &mut Ctx<Self>) -> i64 { 1 }
}

fn main() {}
