use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable]
    pub async fn add(&mut self, _ctx: &mut Ctx<Self>, by: i64) -> i64 { by }
}

fn wrong_argument_type() {
    let _ = A::calls().add("five");
}

fn main() {}
