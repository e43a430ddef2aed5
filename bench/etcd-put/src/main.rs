//! Puts distinct keys into etcd from N concurrent clients and reports puts/s and latency.

use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Comma-separated client URLs, e.g. http://127.0.0.1:2379,http://127.0.0.1:2381
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long, default_value_t = 2000)]
    total: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 64)]
    value_size: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = etcd_client::Client::connect(&args.endpoints, None).await?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let value = "x".repeat(args.value_size);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let mut kv = client.kv_client();
        let next = next.clone();
        let value = value.clone();
        let total = args.total;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                kv.put(format!("bench/{i}"), value.clone(), None).await?;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let wall = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "| etcd 3-member cluster, single-key puts | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
        lat.len(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!("etcd_puts_per_second {:.1}", lat.len() as f64 / wall.as_secs_f64());
    Ok(())
}
