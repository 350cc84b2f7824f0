//! gRPC semantics through the mesh: every call kind, metadata both ways,
//! error statuses, deadlines and large messages arrive intact.

use etcd_mesh_demo::backend::ECHO_HEADER;
use etcd_mesh_demo::client::served_by;
use etcd_mesh_demo::proto::{CountRequest, SayRequest};
use etcd_mesh_e2e::{Backend, Mesh};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::Code;

fn say(text: &str) -> SayRequest {
    SayRequest {
        text: text.into(),
        ..SayRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_kind_crosses_the_mesh_intact() {
    let mesh = Mesh::start(2).await;
    let backend = Backend::registered(mesh.etcd_endpoints(), 1).await;
    mesh.settle(&[backend.addr]).await;
    let mut client = mesh.clients(1).await.remove(0);
    let here = backend.addr.to_string();

    // Unary, with request metadata echoed back as response metadata.
    let mut request = tonic::Request::new(say("hello"));
    request
        .metadata_mut()
        .insert(ECHO_HEADER, "marker-42".parse().expect("ascii"));
    let response = client.say(request).await.expect("unary");
    assert_eq!(
        response
            .metadata()
            .get(ECHO_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("marker-42")
    );
    assert_eq!(served_by(response.metadata()).expect("served by"), here);
    assert_eq!(response.into_inner().text, "hello");

    // Server streaming: 500 replies, in order.
    let mut stream = client
        .count(CountRequest { count: 500 })
        .await
        .expect("count")
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(reply) = stream.next().await {
        indexes.push(reply.expect("stream item").index);
    }
    assert_eq!(indexes, (0..500).collect::<Vec<_>>());

    // Client streaming.
    let words = tokio_stream::iter(["a", "b", "c"].map(say));
    let joined = client.collect(words).await.expect("collect").into_inner();
    assert_eq!(joined.text, "a b c");

    // Bidirectional: each message answered as it goes.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("chat")
        .into_inner();
    for i in 0..20 {
        tx.send(say(&format!("m{i}"))).await.expect("send");
        let reply = replies.next().await.expect("a reply").expect("ok");
        assert_eq!(reply.text, format!("m{i}"));
    }
    drop(tx);
    assert!(
        replies.next().await.is_none(),
        "the stream ends with the client's"
    );

    // Error statuses keep their code and message.
    let failing = SayRequest {
        text: "no such user: 7".into(),
        fail_with: Code::NotFound as u32,
        ..SayRequest::default()
    };
    let status = client.say(failing).await.expect_err("fails");
    assert_eq!(
        (status.code(), status.message()),
        (Code::NotFound, "no such user: 7")
    );

    // Deadlines cross the mesh: only `grpc-timeout` is sent (no client
    // timer), so the call can end early only if the backend got it.
    let mut slow = tonic::Request::new(SayRequest {
        delay_ms: 3_000,
        ..SayRequest::default()
    });
    slow.metadata_mut()
        .insert("grpc-timeout", "200m".parse().expect("ascii"));
    let started = Instant::now();
    let status = client
        .say(slow)
        .await
        .expect_err("the deadline ends the call");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // 4 MB each way.
    let big = "x".repeat(4 << 20);
    let echoed = client.say(say(&big)).await.expect("4 MB").into_inner();
    assert_eq!(echoed.text.len(), big.len());
    assert!(echoed.text == big);
}
