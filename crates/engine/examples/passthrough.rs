//! A bare HTTP/1.1 pass-through proxy on the libraries crisp is built on (tokio, hyper,
//! pooled keep-alive upstream connections), doing nothing else: no JSON, no keys, no
//! policy, no audit. `bench/run.sh` measures it beside nginx to show what the libraries
//! cost per request on the machine, apart from what crisp does with a request.
//!
//! `passthrough LISTEN_ADDR UPSTREAM_ADDR [LOOPS]`, e.g. `passthrough 127.0.0.1:19093
//! 127.0.0.1:19080 2`: on tokio's work-stealing runtime (crisp's default), or on LOOPS
//! single-threaded runtimes that each accept on their own `SO_REUSEPORT` listener (crisp's
//! `--client-threads`).

use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, hyper::Error>;

fn bad_gateway(why: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(why))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: passthrough LISTEN_ADDR UPSTREAM_ADDR [LOOPS]";
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        return Err(usage.into());
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: SocketAddr = upstream.parse()?;
    eprintln!("passthrough: {listen} -> {upstream}");
    let Some(loops) = args.get(2) else {
        // tokio's work-stealing runtime, one worker per core: crisp's default.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(listen))?;
        return runtime.block_on(serve(listener, upstream));
    };
    // LOOPS single-threaded runtimes, each accepting on its own SO_REUSEPORT listener:
    // crisp's `--client-threads`.
    let loops: usize = loops.parse().map_err(|_| usage)?;
    let threads: Vec<_> = (0..loops)
        .map(|_| {
            std::thread::spawn(
                move || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async {
                        let socket = tokio::net::TcpSocket::new_v4()?;
                        socket.set_reuseport(true)?;
                        socket.bind(listen)?;
                        serve(socket.listen(4096)?, upstream).await
                    })
                },
            )
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "a loop panicked")??;
    }
    Ok(())
}

async fn serve(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    let uri = match format!("http://{upstream}{path}").parse::<hyper::Uri>() {
                        Ok(uri) => uri,
                        Err(e) => return Ok::<_, hyper::Error>(bad_gateway(e.to_string())),
                    };
                    *req.uri_mut() = uri;
                    Ok(match client.request(req).await {
                        Ok(answer) => answer.map(|b| b.boxed()),
                        Err(e) => bad_gateway(e.to_string()),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}
