use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    /// Run by a schedule only.
    #[callable(private)]
    pub async fn payout(&mut self, _ctx: &mut Ctx<Self>, cents: u64) -> u64 { cents }
}

fn schedulable() -> agents::MethodCall<A> {
    A::calls().payout(5)
}

fn not_a_client_method(c: AClient) {
    let _ = c.payout(5);
}

fn main() {}
