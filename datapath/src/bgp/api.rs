//! The GoBGP gRPC client (`proto/gobgp.proto`, compiled by build.rs) and the conversions
//! between Tendril's paths and GoBGP's `google.protobuf.Any`-wrapped NLRI and attributes.

/// The generated messages and client of package `apipb`.
pub mod apipb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("apipb");
}

use apipb::gobgp_api_client::GobgpApiClient;
use hyper_util::rt::TokioIo;
use prost::Message;
use prost_types::Any;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};

/// A client of one gobgpd, over its unix socket.
pub type Client = GobgpApiClient<Channel>;

/// Connects to gobgpd's API on the unix socket `socket` (`--api-hosts unix://…`). The
/// socket is a file, so the agent reaches a daemon running in another network namespace.
pub async fn connect(socket: &Path) -> Result<Client, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = Endpoint::from_static("http://gobgpd.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(GobgpApiClient::new(channel))
}

const TYPE_PREFIX: &str = "type.googleapis.com/apipb.";

/// Wraps `message` as GoBGP expects: type URL `type.googleapis.com/apipb.<name>`.
pub fn pack<M: Message>(name: &str, message: &M) -> Any {
    Any {
        type_url: format!("{TYPE_PREFIX}{name}"),
        value: message.encode_to_vec(),
    }
}

/// The message inside `any` when it is of type `name`.
pub fn unpack<M: Message + Default>(name: &str, any: &Any) -> Option<M> {
    let type_name = any.type_url.strip_prefix(TYPE_PREFIX)?;
    if type_name != name {
        return None;
    }
    M::decode(any.value.as_slice()).ok()
}

pub fn ipv4_unicast() -> apipb::Family {
    apipb::Family {
        afi: apipb::family::Afi::Ip as i32,
        safi: apipb::family::Safi::Unicast as i32,
    }
}

pub fn ipv6_unicast() -> apipb::Family {
    apipb::Family {
        afi: apipb::family::Afi::Ip6 as i32,
        safi: apipb::family::Safi::Unicast as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_round_trips_and_checks_the_type() {
        let origin = apipb::OriginAttribute { origin: 2 };
        let any = pack("OriginAttribute", &origin);
        assert_eq!(any.type_url, "type.googleapis.com/apipb.OriginAttribute");
        assert_eq!(
            unpack::<apipb::OriginAttribute>("OriginAttribute", &any),
            Some(origin)
        );
        assert_eq!(
            unpack::<apipb::NextHopAttribute>("NextHopAttribute", &any),
            None
        );
    }

    #[test]
    fn field_numbers_are_gobgps() {
        // IPAddressPrefix{prefix_len=1: 24, prefix=2: "10.0.0.0"}: the bytes gobgpd reads.
        let nlri = apipb::IpAddressPrefix {
            prefix_len: 24,
            prefix: "10.0.0.0".into(),
        };
        assert_eq!(
            nlri.encode_to_vec(),
            [&[0x08, 24, 0x12, 8][..], b"10.0.0.0"].concat()
        );
    }
}
