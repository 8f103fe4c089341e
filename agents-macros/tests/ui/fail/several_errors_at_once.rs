use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable]
    pub async fn add(&mut self, _ctx: &mut Ctx<Self>) -> i64 { 1 }
    #[callable]
    pub fn broken(self) -> i64 { 1 }
}

fn main() {}
