use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[callable]
    pub async fn add(&mut self, _ctx: &mut Ctx<Self>, name: &str) -> usize { name.len() }
}

fn main() {}
