use agents::interface;

#[interface]
pub trait Rules {
    fn not_async(&self) -> i64;
    async fn with_body(&self) -> i64 { 1 }
    async fn mutable(&mut self) -> i64;
    async fn generic<T>(&self, t: T) -> i64;
    async fn borrowed(&self, s: &str) -> i64;
    async fn aliased(&self) -> std::io::Result<i64>;
    async fn events(&self) -> i64;
    type Extra;
}

fn main() {}
