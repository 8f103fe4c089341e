use agents::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Default)]
pub struct HttpServer2 {
    hits: u64,
}

impl Agent for HttpServer2 {}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("nope")]
pub struct Nope;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub x: i32,
    pub y: i32,
}

#[agent(class = "web")]
impl HttpServer2 {
    /// Unit return.
    #[callable]
    pub async fn touch(&mut self, _ctx: &mut Ctx<Self>) {
        self.hits += 1;
    }

    /// Plain return, several arguments, a struct argument.
    #[callable]
    pub async fn shift(&mut self, _ctx: &mut agents::Ctx<Self>, p: Point, dx: i32, mut dy: i32) -> Point {
        dy += 0;
        Point { x: p.x + dx, y: p.y + dy }
    }

    /// Typed error, renamed on the wire.
    #[callable(name = "fail-v2")]
    pub async fn fail(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), Nope> {
        Err(Nope)
    }

    #[agents::callable]
    async fn private_one(&mut self, _ctx: &mut Ctx<Self>) -> std::result::Result<Vec<String>, AppError> {
        Ok(vec![])
    }

    /// Runs every 30 seconds.
    #[schedule(every = "30s")]
    async fn tick(&mut self, _ctx: &mut Ctx<Self>) {
        self.hits += 1;
    }

    #[agents::schedule(cron = "0 9 * * MON-FRI", tz = "Europe/Paris")]
    async fn morning(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Ok(())
    }

    /// Not callable: a helper.
    fn helper(&self) -> u64 {
        self.hits
    }
}

#[derive(Default)]
struct Empty;
impl Agent for Empty {}
#[agent]
impl Empty {}

fn main() {
    use agents::AgentClass;
    assert_eq!(<HttpServer2 as AgentClass>::CLASS, "web");
    assert_eq!(<Empty as AgentClass>::CLASS, "empty");
    let names: Vec<_> = HttpServer2::METHODS.iter().map(|m| m.name).collect();
    assert_eq!(names, ["touch", "shift", "fail-v2", "private_one"]);
    let s = HttpServer2::SCHEDULES;
    assert_eq!((s[0].method, s[0].every_ms, s[0].cron), ("tick", Some(30_000), None));
    assert_eq!((s[1].method, s[1].cron, s[1].tz), ("morning", Some("0 9 * * MON-FRI"), Some("Europe/Paris")));
    assert_eq!(HttpServer2::METHODS[1].params, ["p: Point", "dx: i32", "dy: i32"]);
    assert_eq!(HttpServer2::METHODS[2].error, Some("Nope"));
    let call = HttpServer2::calls().shift(Point { x: 1, y: 2 }, 3, 4);
    assert_eq!(call.method(), "shift");
    let _client: fn(HttpServer2Client) -> _ = |c: HttpServer2Client| async move {
        let _: Result<Point, RpcError> = c.shift(Point { x: 0, y: 0 }, 1, 1).await;
        let _: Result<(), RpcError<Nope>> = c.fail().await;
        let _: Result<Vec<String>, RpcError<AppError>> = c.private_one().await;
    };
    let _ = HttpServer2::default().helper();
}
