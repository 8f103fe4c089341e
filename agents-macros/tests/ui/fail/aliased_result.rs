use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable]
    pub async fn sub(&mut self, _ctx: &mut Ctx<Self>) -> std::io::Result<i64> { Ok(1) }
}

fn main() {}
