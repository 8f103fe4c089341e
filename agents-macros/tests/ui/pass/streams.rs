use agents::prelude::*;
use agents::client::CallStream;

#[derive(Default)]
struct Feed;
impl Agent for Feed {}

#[agent]
impl Feed {
    /// Infallible: the client's error type is `NoError`.
    #[callable]
    async fn count(&mut self, _ctx: &mut Ctx<Self>, n: u32) -> Streaming<u32> {
        Streaming::iter(0..n)
    }

    /// Fallible: the call and the stream fail with the same typed error.
    #[callable]
    async fn words(
        &mut self,
        _ctx: &mut Ctx<Self>,
        text: String,
    ) -> Result<agents::Streaming<String, AppError>, AppError> {
        if text.is_empty() {
            return Err(AppError::msg("empty"));
        }
        let words: Vec<String> = text.split(' ').map(str::to_owned).collect();
        Ok(Streaming::iter(words))
    }

    /// A fallible call whose stream cannot fail.
    #[callable]
    async fn lines(&mut self, _ctx: &mut Ctx<Self>) -> Result<Streaming<String>, AppError> {
        Ok(Streaming::iter(Vec::new()))
    }
}

fn main() {
    let _client: fn(FeedClient) -> _ = |c: FeedClient| async move {
        let _: CallStream<u32, agents::NoError> = c.count(3).await;
        let _: CallStream<String, AppError> = c.words("a b".into()).await;
        let _: CallStream<String, AppError> = c.lines().await;
    };
}
