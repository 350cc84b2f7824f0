//! The `demo.Echo` backend: a real tonic server that says who served each
//! call, with the gRPC health service beside it.

use crate::proto::echo_server::{Echo, EchoServer};
use crate::proto::{CountReply, CountRequest, SayReply, SayRequest};
use std::pin::Pin;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status, Streaming};

/// The request metadata echoed back in the reply (to show that metadata
/// crosses the mesh both ways).
pub const ECHO_HEADER: &str = "x-echo";
/// The reply metadata naming the backend.
pub const SERVED_BY_HEADER: &str = "x-served-by";

#[derive(Debug, Clone)]
pub struct EchoBackend {
    served_by: String,
}

impl EchoBackend {
    pub fn new(served_by: impl Into<String>) -> Self {
        EchoBackend {
            served_by: served_by.into(),
        }
    }

    fn reply<T, R>(&self, request: &Request<R>, message: T) -> Response<T> {
        let mut response = Response::new(message);
        let metadata = response.metadata_mut();
        if let Ok(value) = MetadataValue::try_from(self.served_by.as_str()) {
            metadata.insert(SERVED_BY_HEADER, value);
        }
        if let Some(echo) = request.metadata().get(ECHO_HEADER) {
            metadata.insert(ECHO_HEADER, echo.clone());
        }
        response
    }

    fn say_reply(&self, text: String) -> SayReply {
        SayReply {
            text,
            served_by: self.served_by.clone(),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoBackend {
    async fn say(&self, request: Request<SayRequest>) -> Result<Response<SayReply>, Status> {
        let message = request.get_ref();
        if message.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(message.delay_ms))).await;
        }
        if message.fail_with != 0 {
            let code = Code::from_i32(i32::try_from(message.fail_with).unwrap_or(2));
            return Err(Status::new(code, message.text.clone()));
        }
        let reply = self.say_reply(message.text.clone());
        Ok(self.reply(&request, reply))
    }

    type CountStream = BoxStream<CountReply>;

    async fn count(
        &self,
        request: Request<CountRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        let served_by = self.served_by.clone();
        let replies = (0..request.get_ref().count).map(move |index| {
            Ok(CountReply {
                index,
                served_by: served_by.clone(),
            })
        });
        let stream: Self::CountStream = Box::pin(tokio_stream::iter(replies));
        Ok(self.reply(&request, stream))
    }

    async fn collect(
        &self,
        request: Request<Streaming<SayRequest>>,
    ) -> Result<Response<SayReply>, Status> {
        let metadata_only = Request::from_parts(request.metadata().clone(), Default::default(), ());
        let mut stream = request.into_inner();
        let mut texts = Vec::new();
        while let Some(message) = stream.next().await {
            texts.push(message?.text);
        }
        let reply = self.say_reply(texts.join(" "));
        Ok(self.reply(&metadata_only, reply))
    }

    type ChatStream = BoxStream<SayReply>;

    async fn chat(
        &self,
        request: Request<Streaming<SayRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let metadata_only = Request::from_parts(request.metadata().clone(), Default::default(), ());
        let backend = self.clone();
        let replies = request
            .into_inner()
            .map(move |message| message.map(|m| backend.say_reply(m.text)));
        let stream: Self::ChatStream = Box::pin(replies);
        Ok(self.reply(&metadata_only, stream))
    }
}

/// Serves `demo.Echo` and `grpc.health.v1.Health` on `listener` until
/// `shutdown`, then lets in-flight calls finish.
pub async fn serve(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (_serving, told) = tokio::sync::watch::channel(true);
    serve_with_health(listener, shutdown, told).await
}

/// [`serve`], with `demo.Echo`'s health (`SERVING` or `NOT_SERVING`) told
/// by `serving`: how an instance asks to be drained without leaving etcd.
pub async fn serve_with_health(
    listener: TcpListener,
    shutdown: CancellationToken,
    mut serving: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let served_by = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EchoServer<EchoBackend>>().await;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            if *serving.borrow_and_update() {
                health.set_serving::<EchoServer<EchoBackend>>().await;
            } else {
                health.set_not_serving::<EchoServer<EchoBackend>>().await;
            }
            tokio::select! {
                changed = serving.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    });
    let echo = EchoServer::new(EchoBackend::new(served_by))
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(echo)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
}
