use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent(klass = "a")]
impl A {}

fn main() {}
