//! End to end: the real example server (`examples/serve`, built by
//! `cargo test`) on a loopback port, driven over real HTTP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The example server binary, next to this test's own binary.
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    profile_dir.join(format!("examples/serve{}", std::env::consts::EXE_SUFFIX))
}

struct Server {
    child: Child,
    addr: SocketAddr,
    /// The admin listener: probes and metrics apart from the data plane.
    admin: SocketAddr,
}

/// A port free now on loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    fn start(args: &[&str]) -> Server {
        Self::start_with(args, Stdio::inherit(), "warn")
    }

    fn start_with(args: &[&str], stderr: Stdio, log_filter: &str) -> Server {
        let (port, admin) = (free_port(), free_port());
        let child = Command::new(server_binary())
            .args(["--port", &port.to_string()])
            .args(["--admin-port", &admin.to_string()])
            .args(args)
            .env("RUST_LOG", log_filter)
            // The server sets candle's thread count itself.
            .env_remove("RAYON_NUM_THREADS")
            .env_remove("CANDLE_NUM_THREADS")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the example server is built by `cargo test`");
        let server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        };
        server.wait_until_started();
        server
    }

    /// Polls `/startupz` until it answers 200; `/livez` is 200 throughout.
    fn wait_until_started(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(response) = request(self.admin, "GET", "/startupz", None) {
                assert_eq!(get(self.admin, "/livez").status, 200);
                if response.status == 200 {
                    assert_eq!(get(self.admin, "/readyz").status, 200);
                    return;
                }
                assert_eq!(response.status, 503, "{}", response.body);
                assert_eq!(response.json()["check"], "started");
            }
            assert!(Instant::now() < deadline, "the server never started");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        self.wait(Duration::from_secs(60))
    }

    /// Sends the server a signal (`kill`'s `-TERM`, `-INT`).
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits until readiness is off, as it is at once in a drain.
    fn until_draining(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(self.admin, "/readyz").status != 503 {
            assert!(Instant::now() < deadline, "readiness never turned off");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the queue or the replicas hold work.
    fn until_queued(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = get(self.addr, "/metrics").body;
            let held: f64 = metrics
                .lines()
                .filter(|line| {
                    line.starts_with("candlewick_queue_depth{")
                        || line.starts_with("candlewick_in_flight_requests{")
                })
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if held > 0.0 {
                return;
            }
            assert!(Instant::now() < deadline, "nothing was queued: {metrics}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn embeddings(&self) -> Vec<Vec<f32>> {
        assert_eq!(self.status, 200, "{}", self.body);
        serde_json::from_str(&self.body).unwrap()
    }
}

/// One HTTP/1.1 request on a fresh connection.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    request_with(addr, method, path, &[], body)
}

/// [`request`] with extra headers.
fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or_default();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no complete response: {text:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let headers = lines
        .filter_map(|line| line.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}

fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, None).unwrap()
}

fn embed(addr: SocketAddr, body: &Value) -> Response {
    request(addr, "POST", "/embed", Some(body.to_string().as_bytes())).unwrap()
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (norm(a) * norm(b))
}

#[test]
fn embeddings_are_right_sized_unit_norm_deterministic_and_batch_invariant() {
    let server = Server::start(&[]);
    let info = get(server.addr, "/info").json();
    let dimension = info["model"]["dimension"].as_u64().unwrap() as usize;
    assert_eq!(info["health"], "ready");
    // Started with no thread settings, it made candle compute at its
    // replicas' parallelism (one thread each) before any thread started.
    assert_eq!(info["cpu_threads_per_replica"], 1);
    assert_eq!(info["candle_cpu_threads"], 1, "{info}");
    assert_eq!(info["cpu_threads_warning"], Value::Null);

    let one = embed(server.addr, &json!({"inputs": "What is deep learning?"})).embeddings();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].len(), dimension);
    assert!((norm(&one[0]) - 1.0).abs() < 1e-4, "norm {}", norm(&one[0]));

    let again = embed(server.addr, &json!({"inputs": ["What is deep learning?"]})).embeddings();
    assert_eq!(one, again, "the same text gave another vector");

    let texts = [
        "a short one",
        "What is deep learning?",
        "a rather longer sentence about serving models in production",
    ];
    let batched = embed(server.addr, &json!({"inputs": texts})).embeddings();
    for (text, from_batch) in texts.iter().zip(&batched) {
        let single = &embed(server.addr, &json!({"inputs": text})).embeddings()[0];
        let diff = single
            .iter()
            .zip(from_batch)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{text:?}: batched and single differ by {diff}");
    }

    let raw = embed(
        server.addr,
        &json!({"inputs": "What is deep learning?", "normalize": false}),
    )
    .embeddings();
    assert!(cosine(&raw[0], &one[0]) > 0.9999);

    let metrics = get(server.addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("candlewick_requests_total{"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("candlewick_batch_size_bucket{"));
}

#[test]
fn bad_input_gets_a_4xx_with_a_json_error() {
    let server = Server::start(&["--max-client-batch", "4"]);
    let post = |body: &[u8]| request(server.addr, "POST", "/embed", Some(body)).unwrap();
    let cases: Vec<(&str, Response, u16)> = vec![
        ("malformed JSON", post(b"{\"inputs\": "), 400),
        ("wrong type", post(br#"{"inputs": 42}"#), 422),
        ("missing inputs", post(br#"{"normalize": true}"#), 422),
        ("empty list", post(br#"{"inputs": []}"#), 422),
        ("empty text", post(br#"{"inputs": "  "}"#), 422),
        (
            "too many inputs",
            post(br#"{"inputs": ["a", "b", "c", "d", "e"]}"#),
            413,
        ),
        (
            "too long without truncate",
            post(
                json!({"inputs": "word ".repeat(600)})
                    .to_string()
                    .as_bytes(),
            ),
            413,
        ),
        (
            "body over the limit",
            post(&vec![b' '; 3 * 1024 * 1024]),
            413,
        ),
        ("unknown route", get(server.addr, "/nope"), 404),
        ("wrong method", get(server.addr, "/embed"), 405),
        (
            "too many texts to tokenize",
            post_json(server.addr, "/tokenize", &json!({"inputs": vec!["a"; 5]})),
            413,
        ),
        (
            // More tokens than 4 inputs of the model's most: an answer of
            // that size is not built.
            "too many tokens to tokenize",
            post_json(
                server.addr,
                "/tokenize",
                &json!({"inputs": "! ".repeat(4 * 512)}),
            ),
            413,
        ),
    ];
    for (what, response, status) in cases {
        assert_eq!(response.status, status, "{what}: {}", response.body);
        let error = response.json();
        assert!(error["error"].is_string(), "{what}: {}", response.body);
        assert!(error["error_type"].is_string(), "{what}: {}", response.body);
    }
    // Each refused after its room in the queue was reserved (the /embed
    // cases other than the oversized body: seven) counts as invalid.
    let metrics = get(server.addr, "/metrics").body;
    let invalid: f64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with("candlewick_requests_total{") && line.contains("outcome=\"invalid\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(invalid, 7.0, "{metrics}");
    // Truncation makes the long text acceptable.
    let truncated = embed(
        server.addr,
        &json!({"inputs": "word ".repeat(600), "truncate": true}),
    );
    assert_eq!(truncated.embeddings().len(), 1);
    // And the server still serves.
    assert_eq!(
        embed(server.addr, &json!({"inputs": "still here"})).status,
        200
    );
}

#[test]
fn overload_gets_429_with_retry_after_and_the_server_survives() {
    let server = Server::start(&[
        "--replicas",
        "1",
        "--max-batch-size",
        "1",
        "--queue-capacity",
        "16",
    ]);
    let addr = server.addr;
    // Each request fills the whole queue: while one waits, the others are shed.
    let body = json!({"inputs": vec!["overload the only replica with a long enough sentence"; 16]});
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let body = body.to_string();
            std::thread::spawn(move || {
                request(addr, "POST", "/embed", Some(body.as_bytes())).unwrap()
            })
        })
        .collect();
    let responses: Vec<Response> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let rejected: Vec<&Response> = responses.iter().filter(|r| r.status == 429).collect();
    assert!(!rejected.is_empty(), "no request was shed");
    for response in &rejected {
        let retry_after: u64 = response
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!(retry_after >= 1);
        assert_eq!(response.json()["error_type"], "overloaded");
    }
    assert!(responses.iter().all(|r| r.status == 200 || r.status == 429));
    assert_eq!(
        embed(addr, &json!({"inputs": "after the storm"})).status,
        200
    );
    assert_eq!(get(addr, "/livez").status, 200);
}

#[test]
fn sigterm_during_load_answers_every_accepted_request_and_exits_zero() {
    let mut server = Server::start(&["--replicas", "1", "--max-batch-size", "4"]);
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let body =
                        json!({"inputs": format!("client {i} keeps the replica busy with text")});
                    let sent = Instant::now();
                    let outcome =
                        request(addr, "POST", "/embed", Some(body.to_string().as_bytes()))
                            .map(|response| response.status)
                            .map_err(|err| err.to_string());
                    let refused = outcome.is_err();
                    outcomes.push((sent, outcome));
                    if refused {
                        break;
                    }
                }
                outcomes
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    let status = server.terminate();
    stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(status.success(), "exit status {status:?}");
    let before: Vec<_> = outcomes
        .iter()
        .filter(|(sent, _)| *sent < signalled)
        .collect();
    assert!(before.iter().filter(|(_, o)| *o == Ok(200)).count() > 0);
    for (_, outcome) in before {
        // Admitted before the signal: its embedding. Still in flight to
        // admission when the drain began: a typed 503. Never lost.
        assert!(
            matches!(outcome, Ok(200) | Ok(503)),
            "a request sent before SIGTERM: {outcome:?}"
        );
    }
    for (_, outcome) in outcomes.iter().filter(|(sent, _)| *sent >= signalled) {
        // Sent while draining: a typed 503, or no connection once the
        // listener has closed; never a wrong answer.
        assert!(matches!(outcome, Ok(200) | Ok(503) | Err(_)), "{outcome:?}");
    }
}

/// Reads one response from a kept-alive `stream`: the status, the headers
/// (lower-cased names) and the body, by its `Content-Length`.
fn read_response(stream: &mut TcpStream) -> Response {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("a response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    Response {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

/// One replica running one input of 512 tokens at a time, with time
/// enough for a drain of many of them.
const ONE_LONG_INPUT_AT_A_TIME: [&str; 16] = [
    "--header-timeout-ms",
    "600000",
    "--replicas",
    "1",
    "--max-batch-size",
    "1",
    "--max-batch-tokens",
    "512",
    "--max-queue-time-ms",
    "600000",
    "--request-timeout-ms",
    "600000",
    "--http-timeout-ms",
    "600000",
    "--drain-timeout-s",
    "600",
];

/// Sends `server` (running [`ONE_LONG_INPUT_AT_A_TIME`]) inputs of 512
/// tokens for at least `work` of compute, sized from one timed input (some
/// 2 s in a debug build, tens of ms in a release one), and returns once they
/// are queued; each client returns its status, or why it got none.
fn queue_long_inputs(
    server: &Server,
    work: Duration,
) -> Vec<std::thread::JoinHandle<std::io::Result<u16>>> {
    let long = "word ".repeat(600);
    let started = Instant::now();
    let one = embed(server.addr, &json!({"inputs": long, "truncate": true}));
    assert_eq!(one.status, 200, "{}", one.body);
    let each = started.elapsed().max(Duration::from_millis(1));
    let inputs = (work.as_secs_f64() / each.as_secs_f64()).ceil() as usize;
    // Within the queue's 512, in requests of at most 64 inputs.
    let inputs = inputs.clamp(1, 512);
    let addr = server.addr;
    let clients = (0..inputs.div_ceil(64))
        .map(|i| {
            let n = (inputs - i * 64).min(64);
            let body = json!({"inputs": vec![long.clone(); n], "truncate": true});
            let body = body.to_string();
            std::thread::spawn(move || {
                request(addr, "POST", "/embed", Some(body.as_bytes())).map(|r| r.status)
            })
        })
        .collect();
    server.until_queued();
    clients
}

#[test]
fn a_draining_server_says_retry_after_and_closes_kept_alive_connections() {
    let mut server = Server::start(&ONE_LONG_INPUT_AT_A_TIME);
    // A client on a kept-alive connection, as pooled clients are.
    let mut kept = TcpStream::connect(server.addr).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let info = b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n";
    kept.write_all(info).unwrap();
    assert_eq!(read_response(&mut kept).status, 200);
    let queued = queue_long_inputs(&server, Duration::from_secs(3));
    server.signal("-TERM");
    // Draining: readiness is off at once, and new work is refused.
    server.until_draining();
    let body = json!({"inputs": "too late"}).to_string();
    write!(
        kept,
        "POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let refused = read_response(&mut kept);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error_type"], "draining");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("connection"), Some("close"));
    assert!(closed_by_server(&mut kept), "the connection is closed");
    // The work accepted before the signal is finished (a client still on
    // its way to admission then was refused: 503), and the server exits.
    let statuses: Vec<u16> = queued
        .into_iter()
        .map(|c| c.join().unwrap().unwrap())
        .collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 503)),
        "{statuses:?}"
    );
    assert!(server.wait(Duration::from_secs(120)).success());
}

#[test]
fn a_second_signal_while_draining_exits_at_once() {
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        // A drain far longer than the test waits.
        let mut server = Server::start(&ONE_LONG_INPUT_AT_A_TIME);
        let clients = queue_long_inputs(&server, Duration::from_secs(30));
        server.signal(signal);
        server.until_draining();
        server.signal(signal);
        let status = server.wait(Duration::from_secs(5));
        assert_eq!(status.code(), Some(code), "{signal}: {status:?}");
        for client in clients {
            // Cut off with the process: no answer, rather than a wrong one.
            if let Ok(status) = client.join().unwrap() {
                assert!(matches!(status, 200 | 503), "{status}");
            }
        }
    }
}

#[test]
fn all_minilm_l6_v2_ranks_a_paraphrase_above_an_unrelated_sentence() {
    let Some(dir) = minilm_dir("the MiniLM ranking test") else {
        return;
    };
    let server = Server::start(&["--model-dir", dir.to_str().unwrap()]);
    let vectors = embed(
        server.addr,
        &json!({"inputs": [
            "A man is playing a guitar.",
            "Someone is playing an instrument.",
            "The stock market fell sharply today."
        ]}),
    )
    .embeddings();
    assert_eq!(vectors[0].len(), 384);
    let paraphrase = cosine(&vectors[0], &vectors[1]);
    let unrelated = cosine(&vectors[0], &vectors[2]);
    assert!(
        paraphrase > unrelated + 0.3,
        "paraphrase {paraphrase}, unrelated {unrelated}"
    );
}

/// Runs the server to its exit (bounded); returns its status and stderr.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(server_binary())
        .args(["--port", "0", "--admin-port", "0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the server did not exit: {}", reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

#[test]
fn a_server_that_can_never_serve_exits_non_zero_with_a_sentence() {
    if !cfg!(feature = "cuda") {
        let (status, stderr) = run_to_exit(&["--devices", "cuda:0"]);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("error: cannot run replicas on cuda:0: this build has no CUDA support"),
            "{stderr}"
        );
    }
    let (status, stderr) = run_to_exit(&["--model-dir", "/nonexistent"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: missing /nonexistent"), "{stderr}");
    assert!(!stderr.contains("Missing {"), "Debug output: {stderr}");

    // Malformed weights: every replica fails for good, and the server says why.
    let Some(minilm) = minilm_dir("the malformed-weights case") else {
        return;
    };
    let broken = std::env::temp_dir().join(format!("candlewick-broken-{}", std::process::id()));
    copy_dir(std::path::Path::new(&minilm), &broken);
    std::fs::write(broken.join("model.safetensors"), b"not safetensors").unwrap();
    let (status, stderr) = run_to_exit(&["--model-dir", broken.to_str().unwrap()]);
    std::fs::remove_dir_all(&broken).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: service closed: no replica can serve"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cannot load its model: cannot read"),
        "{stderr}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Reads from `stream` until the server closes it; true if it did (EOF or a
/// reset) within the stream's read timeout, false if that ran out first.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut sink = [0u8; 1024];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) => {
                return !matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// The server's open file descriptors and resident memory (Linux).
fn fds_and_rss(server: &Server) -> (usize, u64) {
    let pid = server.child.id();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap();
    (fds, rss_kb)
}

#[cfg(target_os = "linux")]
#[test]
fn a_thousand_connections_that_never_finish_their_headers_are_closed() {
    let timeout = Duration::from_millis(500);
    let server = Server::start(&["--header-timeout-ms", "500"]);
    assert_eq!(get(server.addr, "/info").status, 200);
    let (fds_before, rss_before) = fds_and_rss(&server);
    let storm = Instant::now();
    let mut held: Vec<TcpStream> = (0..1000)
        .map(|_| {
            let mut stream = TcpStream::connect(server.addr).unwrap();
            stream
                .write_all(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Le")
                .unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            stream
        })
        .collect();
    let connected = storm.elapsed();
    // Meanwhile a well-behaved client is served.
    let during = embed(server.addr, &json!({"inputs": "during the storm"}));
    assert_eq!(during.status, 200, "{}", during.body);
    let served = storm.elapsed();
    let closed = held.iter_mut().map(closed_by_server).filter(|c| *c).count();
    let took = storm.elapsed();
    eprintln!("connected after {connected:?}, served after {served:?}");
    assert_eq!(closed, held.len(), "half-open connections left open");
    eprintln!("1000 half-open connections closed {took:?} after the storm began");
    assert!(
        took < timeout + Duration::from_secs(1),
        "closed only after {took:?}"
    );
    drop(held);
    // An idle keep-alive connection is closed the same way.
    let mut idle = TcpStream::connect(server.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert!(closed_by_server(&mut idle));
    // Nothing stays behind.
    std::thread::sleep(Duration::from_millis(200));
    let (fds_after, rss_after) = fds_and_rss(&server);
    assert!(
        fds_after <= fds_before + 2,
        "file descriptors {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "resident memory {rss_before} kB -> {rss_after} kB"
    );
    assert_eq!(get(server.addr, "/info").status, 200);
}

#[test]
fn a_body_that_stops_arriving_gets_a_json_408() {
    let server = Server::start(&["--body-timeout-ms", "300"]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{\"")
        .unwrap();
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    assert!(raw.starts_with("HTTP/1.1 408"), "{raw}");
    let body: Value = serde_json::from_str(raw.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error_type"], "timeout", "{body}");
}

#[test]
fn a_client_that_stops_reading_loses_its_connection_and_its_slot() {
    // One connection slot: while a client that never reads held it, no
    // other client would be served.
    // The other timeouts are long: only the write timeout can free the slot.
    let server = Server::start(&[
        "--max-connections",
        "1",
        "--write-timeout-ms",
        "500",
        "--header-timeout-ms",
        "120000",
        "--body-timeout-ms",
        "120000",
    ]);
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    // Pipelined requests whose answers (about 2 MB of tokens each) fill the
    // socket's buffers, written from a thread since the server stops
    // reading them once its writes block; none is ever read.
    let body = json!({"inputs": "word ".repeat(30_000)}).to_string();
    let pipelined = format!(
        "POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let writer = {
        let mut stream = stalled.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..16 {
                if stream.write_all(pipelined.as_bytes()).is_err() {
                    break;
                }
            }
        })
    };
    // Waits in the listen backlog until the server gives up on the client
    // that stopped reading (a request that waited longer fails here).
    let started = Instant::now();
    let info = request(server.addr, "GET", "/info", None).expect("served once the slot frees");
    assert_eq!(info.status, 200, "{}", info.body);
    eprintln!("the next client was served after {:?}", started.elapsed());
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert!(
        closed_by_server(&mut stalled),
        "the stalled connection is closed"
    );
    writer.join().unwrap();
}

#[test]
fn a_request_past_the_http_timeout_gets_a_json_504() {
    let server = Server::start(&["--http-timeout-ms", "400", "--body-timeout-ms", "10000"]);
    // Each API answers in its own error shape.
    for (path, body, shape) in [
        (
            "/embed",
            &br#"{"inputs": "slowly"}"#[..],
            r#""error_type":"timeout""#,
        ),
        (
            "/v1/embeddings",
            &br#"{"input": "slowly"}"#[..],
            r#""type":"server_error""#,
        ),
    ] {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        // A byte every 100 ms: never stalled long enough for the body
        // timeout, always too slow for the request timeout.
        for byte in body {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut raw = String::new();
        let _ = stream.read_to_string(&mut raw);
        assert!(raw.starts_with("HTTP/1.1 504"), "{path}: {raw}");
        assert!(raw.contains(shape), "{path}: {raw}");
    }
}

#[test]
fn an_idle_server_admits_a_full_client_batch_as_one() {
    // Anything queued ahead would make a request wait too long...
    let server = Server::start(&["--max-queue-time-ms", "1", "--replicas", "1"]);
    // ...so first measure the service rate.
    for _ in 0..5 {
        assert_eq!(
            embed(server.addr, &json!({"inputs": "warm up"})).status,
            200
        );
    }
    // 64 inputs on an idle server: the request's own inputs are not work
    // ahead of it.
    let long = "a sentence that goes on and on ".repeat(5);
    let body = json!({"inputs": vec![long; 64]});
    let response = embed(server.addr, &body);
    assert_eq!(response.embeddings().len(), 64);
}

#[test]
fn a_request_that_cannot_finish_in_time_even_alone_is_a_413() {
    let server = Server::start(&["--queue-capacity", "16"]);
    // Inputs of many lengths, so the cost model learns what a token costs.
    for words in (1..=8).map(|k| k * 24) {
        let text = "word ".repeat(words);
        assert_eq!(embed(server.addr, &json!({"inputs": text})).status, 200);
    }
    // 16 inputs of the most tokens the model takes: time enough to be
    // prepared, not to be served.
    let long = "word ".repeat(600);
    let body = json!({"inputs": vec![long; 16], "truncate": true}).to_string();
    let headers = [("x-request-timeout-ms", "1000")];
    let response = request_with(
        server.addr,
        "POST",
        "/embed",
        &headers,
        Some(body.as_bytes()),
    )
    .unwrap();
    assert_eq!(response.status, 413, "{}", response.body);
    assert_eq!(response.json()["error_type"], "too_large");
    let message = response.json()["error"].as_str().unwrap().to_owned();
    assert!(
        message.contains("estimated") && message.contains("and it has 0."),
        "{message}"
    );
    assert!(response.header("retry-after").is_none());
    // More inputs than the queue holds can never be served either.
    let many = json!({"inputs": vec!["short"; 17]});
    let response = embed(server.addr, &many);
    assert_eq!(response.status, 413, "{}", response.body);
    assert!(response.body.contains("17 inputs"), "{}", response.body);
    // The OpenAI API says the same in its own shape.
    let response = post_json(
        server.addr,
        "/v1/embeddings",
        &json!({"input": vec!["short"; 17]}),
    );
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(response.json()["error"]["code"], "too_large");
}

#[test]
fn a_client_sets_its_own_deadline_in_a_header() {
    let server = Server::start(&[]);
    let send = |path: &str, body: &str, timeout: &str| {
        let headers = [("x-request-timeout-ms", timeout)];
        request_with(server.addr, "POST", path, &headers, Some(body.as_bytes())).unwrap()
    };
    let (tei, openai) = (r#"{"inputs": "hello"}"#, r#"{"input": "hello"}"#);
    // The handler passes the deadline to the batcher with the request: one
    // already past never reaches the model, and is answered in each API's
    // own shape.
    let late = send("/embed", tei, "0");
    assert_eq!(late.status, 504, "{}", late.body);
    assert_eq!(late.json()["error_type"], "deadline");
    let late = send("/v1/embeddings", openai, "0");
    assert_eq!(late.status, 504, "{}", late.body);
    assert_eq!(late.json()["error"]["code"], "deadline");
    // A malformed one is the client's mistake.
    let malformed = send("/embed", tei, "soon");
    assert_eq!(malformed.status, 400, "{}", malformed.body);
    assert!(
        malformed.body.contains("x-request-timeout-ms"),
        "{}",
        malformed.body
    );
    // One the model can meet is met (capped at the server's own timeout).
    assert_eq!(send("/embed", tei, "60000").embeddings().len(), 1);
    let on_time = send("/v1/embeddings", openai, "18446744073709551615");
    assert_eq!(on_time.status, 200, "{}", on_time.body);
}

#[test]
fn connections_beyond_the_limit_wait_until_a_slot_frees() {
    let server = Server::start(&["--max-connections", "2", "--header-timeout-ms", "60000"]);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = TcpStream::connect(server.addr).unwrap();
            stream.write_all(b"GET /info HTTP/1.1\r\nHo").unwrap();
            stream
        })
        .collect();
    // The third connection is in the backlog: its request is not read.
    let mut third = TcpStream::connect(server.addr).unwrap();
    third
        .write_all(b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut first = [0u8; 16];
    let early = third.read(&mut first);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "answered beyond the limit: {early:?}"
    );
    // A slot frees: now it is served.
    drop(held);
    third
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut raw = String::new();
    third.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    // The control plane does not count against the data plane's limit.
    assert_eq!(get(server.admin, "/readyz").status, 200);
}

#[test]
fn probes_can_be_served_on_the_admin_port_only() {
    let server = Server::start(&["--admin-only"]);
    assert_eq!(get(server.admin, "/readyz").status, 200);
    let metrics = get(server.admin, "/metrics");
    assert_eq!(metrics.status, 200);
    // The process itself, beside the queue: CPU, memory, threads, fds.
    for series in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_threads",
    ] {
        assert!(metrics.body.contains(series), "{series} missing");
    }
    assert_eq!(get(server.addr, "/readyz").status, 404);
    assert_eq!(get(server.addr, "/metrics").status, 404);
}

#[test]
fn a_w3c_traceparent_continues_into_the_request_span() {
    let mut server = Server::start_with(
        &["--log-format", "json"],
        Stdio::piped(),
        "info,tower_http=debug",
    );
    let stderr = server.child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        std::io::BufRead::lines(std::io::BufReader::new(stderr))
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let body = br#"{"inputs": "traced"}"#;
    write!(
        stream,
        "POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\ntraceparent: 00-{trace}-00f067aa0ba902b7-01\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(server.terminate().success());
    let lines = lines.join().unwrap();
    let traced: Vec<Value> = lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["span"]["trace_id"] == trace)
        .collect();
    assert!(
        !traced.is_empty(),
        "no log line in the traced span: {lines:?}"
    );
    assert_eq!(traced[0]["span"]["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(traced[0]["span"]["name"], "http.request");
}

fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, Some(body.to_string().as_bytes())).unwrap()
}

fn vector(value: &Value) -> Vec<f32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(worst <= 1e-5, "{what}: differs by {worst}");
}

/// Decodes OpenAI's base64 embedding: little-endian `f32`s.
fn from_base64(text: &str) -> Vec<f32> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn the_openai_embeddings_api_gives_the_embed_vectors_in_each_encoding() {
    let server = Server::start(&[]);
    let info = get(server.addr, "/info").json();
    let model = info["model_id"].as_str().unwrap().to_owned();
    let dimension = info["model"]["dimension"].as_u64().unwrap() as usize;
    let texts = ["What is deep learning?", "a second text"];
    let reference = embed(server.addr, &json!({"inputs": texts})).embeddings();

    let models = get(server.addr, "/v1/models").json();
    assert_eq!(models["data"][0]["id"], model.as_str());
    assert_eq!(models["object"], "list");

    let floats = post_json(
        server.addr,
        "/v1/embeddings",
        &json!({"input": texts, "model": model}),
    )
    .json();
    assert_eq!(floats["object"], "list");
    assert_eq!(floats["model"], model.as_str());
    for (i, want) in reference.iter().enumerate() {
        assert_eq!(floats["data"][i]["index"], i);
        assert_close(&vector(&floats["data"][i]["embedding"]), want, "float");
    }
    let tokens = floats["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 4, "{}", floats["usage"]);
    assert_eq!(floats["usage"]["total_tokens"], tokens);

    let encoded = post_json(
        server.addr,
        "/v1/embeddings",
        &json!({"input": texts[0], "model": model, "encoding_format": "base64"}),
    )
    .json();
    let decoded = from_base64(encoded["data"][0]["embedding"].as_str().unwrap());
    assert_close(&decoded, &reference[0], "base64");

    // Matryoshka: cut, then unit length again.
    let short = post_json(
        server.addr,
        "/v1/embeddings",
        &json!({"input": texts[0], "dimensions": 8}),
    )
    .json();
    let mut want = reference[0][..8].to_vec();
    let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
    want.iter_mut().for_each(|x| *x /= norm);
    assert_close(&vector(&short["data"][0]["embedding"]), &want, "dimensions");

    // Token ids, as /tokenize gives them.
    let ids: Vec<u64> = get_tokens(server.addr, texts[0]);
    let by_ids = post_json(server.addr, "/v1/embeddings", &json!({"input": [ids]})).json();
    assert_close(
        &vector(&by_ids["data"][0]["embedding"]),
        &reference[0],
        "ids",
    );

    // Bad input: OpenAI's error shape, always a 4xx.
    for (body, status, param) in [
        (json!({"input": "x", "model": "gpt-4"}), 404, "model"),
        (
            json!({"input": "x", "encoding_format": "hex"}),
            400,
            "encoding_format",
        ),
        (json!({"input": "x", "dimensions": 0}), 400, "dimensions"),
        (
            json!({"input": "x", "dimensions": dimension + 1}),
            400,
            "dimensions",
        ),
        (json!({"input": []}), 400, "input"),
        (json!({"input": [[]]}), 400, "input"),
        (json!({"input": [[999_999_999u64]]}), 400, "input"),
        (json!({"inputs": "wrong field"}), 400, ""),
    ] {
        let response = post_json(server.addr, "/v1/embeddings", &body);
        assert_eq!(response.status, status, "{body}: {}", response.body);
        let error = &response.json()["error"];
        assert!(error["message"].as_str().unwrap().len() > 5, "{error}");
        assert_eq!(error["type"], "invalid_request_error", "{error}");
        if !param.is_empty() {
            assert_eq!(error["param"], param, "{body}: {error}");
        }
    }
    let malformed = request(server.addr, "POST", "/v1/embeddings", Some(b"{not json")).unwrap();
    assert_eq!(malformed.status, 400);
    assert!(malformed.json()["error"]["message"].is_string());
    // A wrong method or path under /v1/ answers in the same shape.
    for (method, path, status) in [
        ("GET", "/v1/embeddings", 405),
        ("POST", "/v1/embedding", 404),
    ] {
        let response = request(server.addr, method, path, Some(b"{}")).unwrap();
        assert_eq!(
            response.status, status,
            "{method} {path}: {}",
            response.body
        );
        let error = &response.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{error}");
    }
}

fn get_tokens(addr: SocketAddr, text: &str) -> Vec<u64> {
    let tokens = post_json(addr, "/tokenize", &json!({"inputs": text})).json();
    tokens[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn the_tei_options_of_embed_and_tokenize_work() {
    let server = Server::start(&[]);
    let text = "What is deep learning?";
    let reference = &embed(server.addr, &json!({"inputs": text})).embeddings()[0];

    // normalize: false gives the pooled vector, of another length.
    let raw = &embed(server.addr, &json!({"inputs": text, "normalize": false})).embeddings()[0];
    assert!((norm(raw) - 1.0).abs() > 1e-3, "norm {}", norm(raw));
    let unit: Vec<f32> = raw.iter().map(|x| x / norm(raw)).collect();
    assert_close(&unit, reference, "normalize");

    // Token ids are embedded as they are.
    let ids = get_tokens(server.addr, text);
    let by_ids = &embed(server.addr, &json!({"inputs": ids})).embeddings()[0];
    assert_close(by_ids, reference, "ids");

    // /tokenize: ids, texts, special flags and spans.
    let tokens = post_json(server.addr, "/tokenize", &json!({"inputs": [text]})).json();
    let first = &tokens[0][1];
    assert_eq!(first["special"], false);
    let (start, stop) = (
        first["start"].as_u64().unwrap() as usize,
        first["stop"].as_u64().unwrap() as usize,
    );
    assert_eq!(&text[start..stop], first["text"].as_str().unwrap());
    assert_eq!(tokens[0][0]["special"], true);

    // Truncation keeps the chosen end.
    let max = get(server.addr, "/info").json()["model"]["max_input_tokens"]
        .as_u64()
        .unwrap() as usize;
    let long = format!("{} {}", "alpha ".repeat(max), "omega ".repeat(max));
    let too_long = post_json(server.addr, "/embed", &json!({"inputs": long}));
    assert_eq!(too_long.status, 413, "{}", too_long.body);
    let cut = |direction: &str| {
        embed(
            server.addr,
            &json!({"inputs": long, "truncate": true, "truncation_direction": direction}),
        )
        .embeddings()
        .remove(0)
    };
    let (right, left) = (cut("right"), cut("Left"));
    let alphas = &embed(
        server.addr,
        &json!({"inputs": "alpha ".repeat(max), "truncate": true}),
    )
    .embeddings()[0];
    let omegas = &embed(
        server.addr,
        &json!({"inputs": "omega ".repeat(max), "truncate": true, "truncation_direction": "left"}),
    )
    .embeddings()[0];
    assert_close(&right, alphas, "truncation right keeps the start");
    assert_close(&left, omegas, "truncation left keeps the end");
    // Token ids are cut the same way, and `"truncate": null` is `false`.
    let ids = get_tokens(server.addr, &"alpha ".repeat(max));
    let too_many_ids = post_json(server.addr, "/embed", &json!({"inputs": [ids]}));
    assert_eq!(too_many_ids.status, 422, "{}", too_many_ids.body);
    for (direction, kept) in [("right", &ids[..max]), ("left", &ids[ids.len() - max..])] {
        let body = json!({"inputs": [ids], "truncate": true, "truncation_direction": direction});
        let cut = &embed(server.addr, &body).embeddings()[0];
        let expected = &embed(server.addr, &json!({"inputs": [kept]})).embeddings()[0];
        assert_close(cut, expected, direction);
    }
    let null = embed(server.addr, &json!({"inputs": text, "truncate": null}));
    assert_close(&null.embeddings()[0], reference, "truncate: null");

    // An unknown prompt is a clear 422.
    let unknown = post_json(
        server.addr,
        "/embed",
        &json!({"inputs": text, "prompt_name": "query"}),
    );
    assert_eq!(unknown.status, 422);
    assert!(unknown.body.contains("prompt_name"), "{}", unknown.body);

    // /info is JSON all the way down: no Debug strings.
    let info = get(server.addr, "/info").json();
    assert_eq!(info["admission"]["policy"], "shed");
    assert!(matches!(
        info["model"]["pooling"].as_str(),
        Some("mean" | "cls")
    ));
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn prompts_from_the_model_config_are_prepended() {
    let Some(minilm) = minilm_dir("the prompts test") else {
        return;
    };
    // MiniLM ships no prompts; give a copy some, as E5-style models have.
    let dir = std::env::temp_dir().join(format!("candlewick-prompts-{}", std::process::id()));
    copy_dir(std::path::Path::new(&minilm), &dir);
    std::fs::write(
        dir.join("config_sentence_transformers.json"),
        r#"{"prompts": {"query": "query: ", "passage": "passage: "}}"#,
    )
    .unwrap();
    let server = Server::start(&["--model-dir", dir.to_str().unwrap()]);
    let text = "how do I bake bread?";
    let prompted = &embed(
        server.addr,
        &json!({"inputs": text, "prompt_name": "query"}),
    )
    .embeddings()[0];
    let by_hand = &embed(server.addr, &json!({"inputs": format!("query: {text}")})).embeddings()[0];
    let plain = &embed(server.addr, &json!({"inputs": text})).embeddings()[0];
    assert_close(prompted, by_hand, "prompt_name");
    assert!(
        cosine(prompted, plain) < 0.9999,
        "the prompt changed nothing"
    );
    // Cutting from the left keeps the prompt and drops the text's start.
    let long = format!("{} {text}", "filler ".repeat(1000));
    let cut = |prompt: Option<&str>| {
        let mut body = json!({"inputs": long, "truncate": true, "truncation_direction": "left"});
        if let Some(prompt) = prompt {
            body["prompt_name"] = json!(prompt);
        }
        embed(server.addr, &body).embeddings().remove(0)
    };
    let (kept, none) = (cut(Some("query")), cut(None));
    assert!(cosine(&kept, &none) < 0.9999, "the prompt was cut off");
    let unknown = post_json(
        server.addr,
        "/embed",
        &json!({"inputs": text, "prompt_name": "nope"}),
    );
    assert_eq!(unknown.status, 422);
    assert!(unknown.body.contains("passage, query"), "{}", unknown.body);
    let info = get(server.addr, "/info").json();
    assert_eq!(info["model"]["prompts"], json!(["passage", "query"]));
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_official_openai_and_huggingface_hub_clients_get_the_embed_vectors() {
    let python = std::env::var_os("CANDLEWICK_CLIENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/clients-venv/bin/python"
            ))
        });
    if !python.exists() {
        assert!(
            std::env::var_os("CANDLEWICK_REQUIRE_ALL").is_none(),
            "required but {} is missing (.ci/run installs openai and huggingface_hub there)",
            python.display()
        );
        eprintln!(
            "skipped: no Python with openai and huggingface_hub at {}",
            python.display()
        );
        return;
    }
    let minilm = std::env::var("CANDLEWICK_MINILM_DIR").ok();
    let mut args = Vec::new();
    if let Some(dir) = &minilm {
        args.extend(["--model-dir", dir.as_str()]);
    }
    let server = Server::start(&args);
    let model = get(server.addr, "/info").json()["model_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let output = Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients.py"))
        .args(["--port", &server.addr.port().to_string(), "--model", &model])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("ok: openai"), "{text}");
}

/// The all-MiniLM-L6-v2 directory, when `CANDLEWICK_MINILM_DIR` names one;
/// otherwise says which `case` is skipped (and fails where CI requires it).
fn minilm_dir(case: &str) -> Option<std::ffi::OsString> {
    let dir = std::env::var_os("CANDLEWICK_MINILM_DIR");
    if dir.is_none() {
        assert!(
            std::env::var_os("CANDLEWICK_REQUIRE_ALL").is_none(),
            "required but CANDLEWICK_MINILM_DIR is not set"
        );
        eprintln!(
            "skipped {case}: set CANDLEWICK_MINILM_DIR to the all-MiniLM-L6-v2 directory (.ci/run does)"
        );
    }
    dir
}

#[test]
fn zero_timeouts_limits_and_a_batch_smaller_than_an_input_are_refused_at_start() {
    for flag in [
        "--header-timeout-ms",
        "--write-timeout-ms",
        "--body-timeout-ms",
        "--http-timeout-ms",
        "--max-connections",
        "--request-timeout-ms",
        "--max-queue-time-ms",
        "--max-client-batch",
    ] {
        let (status, stderr) = run_to_exit(&[flag, "0"]);
        assert_eq!(status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains("0 is not in 1.."), "{flag}: {stderr}");
    }
    // A batch too small for the model's longest input would refuse such
    // inputs as the client's fault: refused at start instead.
    let (status, stderr) = run_to_exit(&["--max-batch-tokens", "100"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--max-batch-tokens 100 is below the model's 512 tokens in one input"),
        "{stderr}"
    );
}
