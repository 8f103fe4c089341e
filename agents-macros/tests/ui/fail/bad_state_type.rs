use agents::prelude::*;

#[derive(Default)]
struct Room;
impl Agent for Room {}

#[agent(state = "not a type!")]
impl Room {}

fn main() {}
