use agents::prelude::*;

#[derive(Default)]
pub struct Limiter;
impl Agent for Limiter {}

#[agent(internal, class = "limiter")]
impl Limiter {
    #[callable(internal, name = "take-v1")]
    pub async fn take(&mut self, _ctx: &mut Ctx<Self>, n: u32) -> bool {
        n < 10
    }

    #[callable]
    pub async fn open(&mut self, _ctx: &mut Ctx<Self>) {}
}

fn main() {
    use agents::AgentClass;
    const _: () = assert!(<Limiter as AgentClass>::INTERNAL);
    let infos = <Limiter as AgentClass>::METHODS;
    assert!(infos[0].internal && !infos[1].internal);
}

/// A public agent without callables: its client is public too.
#[derive(Default)]
pub struct Quiet;
impl Agent for Quiet {}

#[agent]
impl Quiet {}
