use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

#[agent]
impl A {
    #[schedule(cron = "*/5 * * * *")]
    async fn purge(&mut self, _ctx: &mut Ctx<Self>, _older_than: u64) {}
}

fn main() {}
