use agents::prelude::*;

#[derive(Default)]
pub struct A;
impl Agent for A {}

type Res<T> = Result<T, AppError>;
#[agent]
impl A {
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>) -> Res<i64> { Ok(1) }
    #[callable]
    pub async fn sub(&mut self, ctx: &mut Ctx<Self>) -> std::io::Result<i64> { Ok(1) }
}

fn main() {}
