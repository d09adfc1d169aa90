//! Layer 5: the kas pods — where they are ([`discovery`]), whether they are fit for new
//! traffic ([`health`]) and which one gets the next stream ([`pool`]), and connecting to one, moving on
//! when a pod cannot be reached ([`connect`]).

pub mod connect;
pub mod discovery;
pub mod h2c;
pub mod health;
pub mod idle;
pub mod pool;
pub mod route;
