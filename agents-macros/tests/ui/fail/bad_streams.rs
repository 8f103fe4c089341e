use agents::prelude::*;

#[derive(Default)]
struct Feed;
impl Agent for Feed {}

#[agent]
impl Feed {
    #[callable]
    async fn words(&mut self, _ctx: &mut Ctx<Self>) -> Result<Streaming<String, String>, AppError> {
        Ok(Streaming::iter(Vec::new()))
    }

    #[callable]
    async fn plain(&mut self, _ctx: &mut Ctx<Self>) -> Streaming<String, AppError> {
        Streaming::iter(Vec::new())
    }

    #[schedule(every = "1m")]
    async fn tick(&mut self, _ctx: &mut Ctx<Self>) -> Streaming<u8> {
        Streaming::iter(Vec::new())
    }
}

fn main() {}
