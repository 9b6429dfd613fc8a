//! A replica's HTTP listener as the tests reach it: one `GET`, and its
//! metrics parsed as Prometheus text.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};

/// One `GET` over HTTP/1.1: the status code and the body.
pub async fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let mut stream =
            std::net::TcpStream::connect(address).expect("connect to the HTTP listener");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a read timeout");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .expect("send the request");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("read the answer within 5 s");
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .expect("an HTTP answer has a head and a body");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("a status code");
        (status, body.to_string())
    })
    .await
    .expect("the request ran")
}

/// Scrapes and parses a replica's metrics.
pub async fn scrape(address: SocketAddr) -> Vec<Sample> {
    let (status, body) = get(address, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|line| Ok(line.to_string()));
    Scrape::parse(lines)
        .expect("the metrics parse as Prometheus text")
        .samples
}

/// The value of the sample `name` with all of `labels`, if there is one.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|sample| sample.metric == name)
        .find(|sample| {
            labels
                .iter()
                .all(|(label, wanted)| sample.labels.get(label) == Some(*wanted))
        })
        .map(|sample| match &sample.value {
            Value::Counter(value) | Value::Gauge(value) | Value::Untyped(value) => *value,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |bucket| bucket.count),
            Value::Summary(_) => f64::NAN,
        })
}
