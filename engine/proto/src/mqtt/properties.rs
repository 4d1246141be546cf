//! MQTT 5.0 properties (§2.2.2): the [`Property`] enum, the ordered
//! [`Properties`] list with typed accessors, and the table of which
//! properties each packet type may carry (used by the decoder).

use crate::ByteStr;
use bytes::Bytes;

/// One MQTT 5.0 property. Wire ids are the associated constants
/// (`Property::TOPIC_ALIAS`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Property {
    PayloadFormatIndicator(u8),
    MessageExpiryInterval(u32),
    ContentType(ByteStr),
    ResponseTopic(ByteStr),
    CorrelationData(Bytes),
    SubscriptionIdentifier(u32),
    SessionExpiryInterval(u32),
    AssignedClientIdentifier(ByteStr),
    ServerKeepAlive(u16),
    AuthenticationMethod(ByteStr),
    AuthenticationData(Bytes),
    RequestProblemInformation(u8),
    WillDelayInterval(u32),
    RequestResponseInformation(u8),
    ResponseInformation(ByteStr),
    ServerReference(ByteStr),
    ReasonString(ByteStr),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    MaximumQoS(u8),
    RetainAvailable(u8),
    UserProperty(ByteStr, ByteStr),
    MaximumPacketSize(u32),
    WildcardSubscriptionAvailable(u8),
    SubscriptionIdentifierAvailable(u8),
    SharedSubscriptionAvailable(u8),
}

impl Property {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

    /// The property identifier on the wire.
    pub fn id(&self) -> u8 {
        match self {
            Property::PayloadFormatIndicator(_) => Self::PAYLOAD_FORMAT_INDICATOR,
            Property::MessageExpiryInterval(_) => Self::MESSAGE_EXPIRY_INTERVAL,
            Property::ContentType(_) => Self::CONTENT_TYPE,
            Property::ResponseTopic(_) => Self::RESPONSE_TOPIC,
            Property::CorrelationData(_) => Self::CORRELATION_DATA,
            Property::SubscriptionIdentifier(_) => Self::SUBSCRIPTION_IDENTIFIER,
            Property::SessionExpiryInterval(_) => Self::SESSION_EXPIRY_INTERVAL,
            Property::AssignedClientIdentifier(_) => Self::ASSIGNED_CLIENT_IDENTIFIER,
            Property::ServerKeepAlive(_) => Self::SERVER_KEEP_ALIVE,
            Property::AuthenticationMethod(_) => Self::AUTHENTICATION_METHOD,
            Property::AuthenticationData(_) => Self::AUTHENTICATION_DATA,
            Property::RequestProblemInformation(_) => Self::REQUEST_PROBLEM_INFORMATION,
            Property::WillDelayInterval(_) => Self::WILL_DELAY_INTERVAL,
            Property::RequestResponseInformation(_) => Self::REQUEST_RESPONSE_INFORMATION,
            Property::ResponseInformation(_) => Self::RESPONSE_INFORMATION,
            Property::ServerReference(_) => Self::SERVER_REFERENCE,
            Property::ReasonString(_) => Self::REASON_STRING,
            Property::ReceiveMaximum(_) => Self::RECEIVE_MAXIMUM,
            Property::TopicAliasMaximum(_) => Self::TOPIC_ALIAS_MAXIMUM,
            Property::TopicAlias(_) => Self::TOPIC_ALIAS,
            Property::MaximumQoS(_) => Self::MAXIMUM_QOS,
            Property::RetainAvailable(_) => Self::RETAIN_AVAILABLE,
            Property::UserProperty(..) => Self::USER_PROPERTY,
            Property::MaximumPacketSize(_) => Self::MAXIMUM_PACKET_SIZE,
            Property::WildcardSubscriptionAvailable(_) => Self::WILDCARD_SUBSCRIPTION_AVAILABLE,
            Property::SubscriptionIdentifierAvailable(_) => Self::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            Property::SharedSubscriptionAvailable(_) => Self::SHARED_SUBSCRIPTION_AVAILABLE,
        }
    }
}

/// The properties of one packet (or of a will), in wire order so that
/// re-encoding is byte-exact. Empty (the common case) allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties(pub Vec<Property>);

/// Accessors for single-valued properties: the first occurrence, if any.
macro_rules! accessors {
    ($($name:ident: $variant:ident -> copy $ty:ty;)* $(| $rname:ident: $rvariant:ident -> ref $rty:ty;)*) => {
        impl Properties {
            $(
                pub fn $name(&self) -> Option<$ty> {
                    self.0.iter().find_map(|p| match p {
                        Property::$variant(v) => Some(*v),
                        _ => None,
                    })
                }
            )*
            $(
                pub fn $rname(&self) -> Option<&$rty> {
                    self.0.iter().find_map(|p| match p {
                        Property::$rvariant(v) => Some(v),
                        _ => None,
                    })
                }
            )*
        }
    };
}

accessors! {
    payload_format_indicator: PayloadFormatIndicator -> copy u8;
    message_expiry_interval: MessageExpiryInterval -> copy u32;
    session_expiry_interval: SessionExpiryInterval -> copy u32;
    server_keep_alive: ServerKeepAlive -> copy u16;
    request_problem_information: RequestProblemInformation -> copy u8;
    will_delay_interval: WillDelayInterval -> copy u32;
    request_response_information: RequestResponseInformation -> copy u8;
    receive_maximum: ReceiveMaximum -> copy u16;
    topic_alias_maximum: TopicAliasMaximum -> copy u16;
    topic_alias: TopicAlias -> copy u16;
    maximum_qos: MaximumQoS -> copy u8;
    retain_available: RetainAvailable -> copy u8;
    maximum_packet_size: MaximumPacketSize -> copy u32;
    wildcard_subscription_available: WildcardSubscriptionAvailable -> copy u8;
    subscription_identifier_available: SubscriptionIdentifierAvailable -> copy u8;
    shared_subscription_available: SharedSubscriptionAvailable -> copy u8;
    | content_type: ContentType -> ref ByteStr;
    | response_topic: ResponseTopic -> ref ByteStr;
    | correlation_data: CorrelationData -> ref Bytes;
    | assigned_client_identifier: AssignedClientIdentifier -> ref ByteStr;
    | authentication_method: AuthenticationMethod -> ref ByteStr;
    | authentication_data: AuthenticationData -> ref Bytes;
    | response_information: ResponseInformation -> ref ByteStr;
    | server_reference: ServerReference -> ref ByteStr;
    | reason_string: ReasonString -> ref ByteStr;
}

impl Properties {
    pub fn new() -> Self {
        Properties(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Property> {
        self.0.iter()
    }

    /// Appends a property (no check for duplicates).
    pub fn push(&mut self, prop: Property) {
        self.0.push(prop);
    }

    /// Removes every property with wire id `id`.
    pub fn remove(&mut self, id: u8) {
        self.0.retain(|p| p.id() != id);
    }

    /// Replaces the property with `prop`'s id in place (dropping any further
    /// ones with that id), or appends it if there was none.
    pub fn set(&mut self, prop: Property) {
        let id = prop.id();
        let mut new = Some(prop);
        self.0.retain_mut(|p| {
            if p.id() != id {
                return true;
            }
            match new.take() {
                Some(n) => {
                    *p = n;
                    true
                }
                None => false,
            }
        });
        if let Some(n) = new {
            self.0.push(n);
        }
    }

    /// Every Subscription Identifier (a PUBLISH may carry several).
    pub fn subscription_identifiers(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().filter_map(|p| match p {
            Property::SubscriptionIdentifier(v) => Some(*v),
            _ => None,
        })
    }

    /// Every User Property as (name, value), in order.
    pub fn user_properties(&self) -> impl Iterator<Item = (&ByteStr, &ByteStr)> + '_ {
        self.0.iter().filter_map(|p| match p {
            Property::UserProperty(k, v) => Some((k, v)),
            _ => None,
        })
    }
}

impl From<Vec<Property>> for Properties {
    fn from(v: Vec<Property>) -> Self {
        Properties(v)
    }
}

/// Which properties a packet type may carry (§2.2.2.2), as bit sets over ids.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub allowed: u64,
    /// Ids that may appear more than once.
    pub repeatable: u64,
}

const fn bits(ids: &[u8]) -> u64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < ids.len() {
        m |= 1u64 << ids[i];
        i += 1;
    }
    m
}

const fn rules(ids: &[u8], repeatable: &[u8]) -> Rules {
    let user = bits(&[Property::USER_PROPERTY]);
    Rules {
        allowed: bits(ids) | user,
        repeatable: bits(repeatable) | user,
    }
}

type P = Property;

pub(crate) const CONNECT: Rules = rules(
    &[
        P::SESSION_EXPIRY_INTERVAL,
        P::AUTHENTICATION_METHOD,
        P::AUTHENTICATION_DATA,
        P::REQUEST_PROBLEM_INFORMATION,
        P::REQUEST_RESPONSE_INFORMATION,
        P::RECEIVE_MAXIMUM,
        P::TOPIC_ALIAS_MAXIMUM,
        P::MAXIMUM_PACKET_SIZE,
    ],
    &[],
);
pub(crate) const WILL: Rules = rules(
    &[
        P::PAYLOAD_FORMAT_INDICATOR,
        P::MESSAGE_EXPIRY_INTERVAL,
        P::CONTENT_TYPE,
        P::RESPONSE_TOPIC,
        P::CORRELATION_DATA,
        P::WILL_DELAY_INTERVAL,
    ],
    &[],
);
pub(crate) const CONNACK: Rules = rules(
    &[
        P::SESSION_EXPIRY_INTERVAL,
        P::ASSIGNED_CLIENT_IDENTIFIER,
        P::SERVER_KEEP_ALIVE,
        P::AUTHENTICATION_METHOD,
        P::AUTHENTICATION_DATA,
        P::RESPONSE_INFORMATION,
        P::SERVER_REFERENCE,
        P::REASON_STRING,
        P::RECEIVE_MAXIMUM,
        P::TOPIC_ALIAS_MAXIMUM,
        P::MAXIMUM_QOS,
        P::RETAIN_AVAILABLE,
        P::MAXIMUM_PACKET_SIZE,
        P::WILDCARD_SUBSCRIPTION_AVAILABLE,
        P::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        P::SHARED_SUBSCRIPTION_AVAILABLE,
    ],
    &[],
);
pub(crate) const PUBLISH: Rules = rules(
    &[
        P::PAYLOAD_FORMAT_INDICATOR,
        P::MESSAGE_EXPIRY_INTERVAL,
        P::CONTENT_TYPE,
        P::RESPONSE_TOPIC,
        P::CORRELATION_DATA,
        P::SUBSCRIPTION_IDENTIFIER,
        P::TOPIC_ALIAS,
    ],
    &[P::SUBSCRIPTION_IDENTIFIER],
);
/// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
pub(crate) const ACK: Rules = rules(&[P::REASON_STRING], &[]);
pub(crate) const SUBSCRIBE: Rules = rules(&[P::SUBSCRIPTION_IDENTIFIER], &[]);
pub(crate) const UNSUBSCRIBE: Rules = rules(&[], &[]);
pub(crate) const DISCONNECT: Rules = rules(
    &[
        P::SESSION_EXPIRY_INTERVAL,
        P::SERVER_REFERENCE,
        P::REASON_STRING,
    ],
    &[],
);
pub(crate) const AUTH: Rules = rules(
    &[
        P::AUTHENTICATION_METHOD,
        P::AUTHENTICATION_DATA,
        P::REASON_STRING,
    ],
    &[],
);
