use agents::prelude::*;

#[derive(Default)]
pub struct A;

#[agent]
impl Agent for A {}

fn main() {}
