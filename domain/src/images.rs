//! The image catalog: which host image (and so which client commit hash) each region runs.
//!
//! A release switches every region in one event of this one aggregate, so no reader can ever see some regions
//! switched and others not, and replaying the log reproduces the switch exactly.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// The one catalog's aggregate id.
pub const CATALOG_ID: &str = "catalog";

/// One region's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionImage {
    pub image_id: String,
    pub client_commit_hash: String,
}

/// The catalog as the aggregate knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCatalog {
    /// Per region, the active image.
    pub active: BTreeMap<String, RegionImage>,
    /// Images whose hosts the autoscaler never drains (a release's candidates, while it is prepared).
    #[serde(default)]
    pub protected: BTreeSet<String>,
}

/// Commands the catalog takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageCatalogCommand {
    /// Make these images the active ones, all regions at once.
    Activate {
        client_commit_hash: String,
        images: BTreeMap<String, String>,
        at: DateTime<Utc>,
    },
    /// Keep the hosts of these images from being scaled down. Idempotent.
    Protect {
        image_ids: BTreeSet<String>,
        at: DateTime<Utc>,
    },
    /// Let these images' hosts be scaled down again. Idempotent.
    Unprotect {
        image_ids: BTreeSet<String>,
        at: DateTime<Utc>,
    },
}

/// Events of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageCatalogEvent {
    ReleaseActivated {
        client_commit_hash: String,
        /// Region → image id, for every region the release covers.
        images: BTreeMap<String, String>,
        at: DateTime<Utc>,
    },
    ImagesProtected {
        image_ids: BTreeSet<String>,
        at: DateTime<Utc>,
    },
    ImagesUnprotected {
        image_ids: BTreeSet<String>,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for ImageCatalogEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ReleaseActivated { .. } => "ImageReleaseActivated",
            Self::ImagesProtected { .. } => "ImagesProtected",
            Self::ImagesUnprotected { .. } => "ImagesUnprotected",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// Why the catalog refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ImageCatalogError {
    #[error("a release must name at least one region")]
    NoRegions,
}

impl ImageCatalog {
    /// The active image of `region`.
    pub fn active_in(&self, region: &str) -> Option<&RegionImage> {
        self.active.get(region)
    }

    fn decide(
        &self,
        command: ImageCatalogCommand,
    ) -> Result<Vec<ImageCatalogEvent>, ImageCatalogError> {
        match command {
            ImageCatalogCommand::Activate {
                client_commit_hash,
                images,
                at,
            } => {
                if images.is_empty() {
                    return Err(ImageCatalogError::NoRegions);
                }
                let already = images.iter().all(|(region, image_id)| {
                    self.active.get(region).is_some_and(|active| {
                        active.image_id == *image_id
                            && active.client_commit_hash == client_commit_hash
                    })
                });
                if already {
                    return Ok(vec![]);
                }
                Ok(vec![ImageCatalogEvent::ReleaseActivated {
                    client_commit_hash,
                    images,
                    at,
                }])
            }
            ImageCatalogCommand::Protect { image_ids, at } => {
                let new: BTreeSet<String> =
                    image_ids.difference(&self.protected).cloned().collect();
                Ok(if new.is_empty() {
                    vec![]
                } else {
                    vec![ImageCatalogEvent::ImagesProtected { image_ids: new, at }]
                })
            }
            ImageCatalogCommand::Unprotect { image_ids, at } => {
                let held: BTreeSet<String> =
                    image_ids.intersection(&self.protected).cloned().collect();
                Ok(if held.is_empty() {
                    vec![]
                } else {
                    vec![ImageCatalogEvent::ImagesUnprotected {
                        image_ids: held,
                        at,
                    }]
                })
            }
        }
    }
}

impl Aggregate for ImageCatalog {
    const TYPE: &'static str = "image_catalog";
    type Command = ImageCatalogCommand;
    type Event = ImageCatalogEvent;
    type Error = ImageCatalogError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ImageCatalogEvent::ReleaseActivated {
                client_commit_hash,
                images,
                ..
            } => {
                for (region, image_id) in images {
                    self.active.insert(
                        region,
                        RegionImage {
                            image_id,
                            client_commit_hash: client_commit_hash.clone(),
                        },
                    );
                }
            }
            ImageCatalogEvent::ImagesProtected { image_ids, .. } => {
                self.protected.extend(image_ids);
            }
            ImageCatalogEvent::ImagesUnprotected { image_ids, .. } => {
                for image_id in image_ids {
                    self.protected.remove(&image_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    fn images(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(region, image)| (region.to_string(), image.to_string()))
            .collect()
    }

    #[test]
    fn a_release_switches_every_region_in_one_event() {
        TestFramework::<ImageCatalog>::with(())
            .given_no_previous_events()
            .when(ImageCatalogCommand::Activate {
                client_commit_hash: "abc".to_string(),
                images: images(&[("us-east-1", "ami-1"), ("eu-west-1", "ami-2")]),
                at: at(),
            })
            .then_expect_events(vec![ImageCatalogEvent::ReleaseActivated {
                client_commit_hash: "abc".to_string(),
                images: images(&[("us-east-1", "ami-1"), ("eu-west-1", "ami-2")]),
                at: at(),
            }]);
    }

    #[test]
    fn activating_the_active_release_again_changes_nothing() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![ImageCatalogEvent::ReleaseActivated {
                client_commit_hash: "abc".to_string(),
                images: images(&[("us-east-1", "ami-1")]),
                at: at(),
            }])
            .when(ImageCatalogCommand::Activate {
                client_commit_hash: "abc".to_string(),
                images: images(&[("us-east-1", "ami-1")]),
                at: at(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn protecting_records_only_images_not_yet_protected_and_unprotecting_only_those_held() {
        let set = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect::<BTreeSet<_>>();
        let given = vec![ImageCatalogEvent::ImagesProtected {
            image_ids: set(&["ami-1"]),
            at: at(),
        }];
        TestFramework::<ImageCatalog>::with(())
            .given(given.clone())
            .when(ImageCatalogCommand::Protect {
                image_ids: set(&["ami-1", "ami-2"]),
                at: at(),
            })
            .then_expect_events(vec![ImageCatalogEvent::ImagesProtected {
                image_ids: set(&["ami-2"]),
                at: at(),
            }]);
        TestFramework::<ImageCatalog>::with(())
            .given(given)
            .when(ImageCatalogCommand::Unprotect {
                image_ids: set(&["ami-1", "ami-3"]),
                at: at(),
            })
            .then_expect_events(vec![ImageCatalogEvent::ImagesUnprotected {
                image_ids: set(&["ami-1"]),
                at: at(),
            }]);
    }

    #[test]
    fn a_release_without_regions_is_refused() {
        TestFramework::<ImageCatalog>::with(())
            .given_no_previous_events()
            .when(ImageCatalogCommand::Activate {
                client_commit_hash: "abc".to_string(),
                images: BTreeMap::new(),
                at: at(),
            })
            .then_expect_error(ImageCatalogError::NoRegions);
    }
}
