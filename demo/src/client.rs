//! A client of `demo.Echo` that counts which backend served each call.

use crate::backend::SERVED_BY_HEADER;
use crate::proto::echo_client::EchoClient;
use crate::proto::SayRequest;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tonic::transport::Channel;
use tonic::Status;

pub type Client = EchoClient<Channel>;

/// A client over one HTTP/2 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(EchoClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}

/// One unary call; returns the backend that served it.
pub async fn say(client: &mut Client, request: SayRequest) -> Result<String, Status> {
    let response = client.say(request).await?;
    served_by(response.metadata())
}

pub fn served_by(metadata: &tonic::metadata::MetadataMap) -> Result<String, Status> {
    metadata
        .get(SERVED_BY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| Status::internal("reply without x-served-by"))
}

/// Sends `calls` empty `Say` calls over `clients` (round-robin over them,
/// one call at a time per client, all clients at once) and counts the
/// backends that served them.
pub async fn split(clients: &[Client], calls: usize) -> Result<BTreeMap<String, usize>, Status> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in clients.iter().enumerate() {
        let mut client = client.clone();
        let share = calls / clients.len() + usize::from(i < calls % clients.len());
        tasks.spawn(async move {
            let mut counts = BTreeMap::new();
            for _ in 0..share {
                let backend = say(&mut client, SayRequest::default()).await?;
                *counts.entry(backend).or_insert(0) += 1;
            }
            Ok::<_, Status>(counts)
        });
    }
    let mut total = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let counts = joined.map_err(|e| Status::internal(e.to_string()))??;
        for (backend, n) in counts {
            *total.entry(backend).or_insert(0) += n;
        }
    }
    Ok(total)
}
