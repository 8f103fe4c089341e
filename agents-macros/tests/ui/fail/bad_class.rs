use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent(class = "Not Valid")]
impl A {}

fn main() {}
