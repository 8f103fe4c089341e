use agents::prelude::*;

#[agents::interface]
pub trait Api {
    async fn ping(&self) -> u8;
}

#[derive(Default)]
pub struct A;
impl Agent for A {}

// The interface names the state and event types, not the impl.
#[agent(event = "String")]
impl Api for A {
    async fn ping(&mut self, _ctx: &mut Ctx<Self>) -> u8 { 1 }
}

#[derive(Default)]
pub struct B;
impl Agent for B {}

// A method of another shape than the trait's is the compiler's to refuse.
#[agent]
impl Api for B {
    async fn ping(&mut self, _ctx: &mut Ctx<Self>) -> u16 { 1 }
}

fn main() {}
