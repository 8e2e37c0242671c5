//! The image catalog: which host image (and so which client commit hash) each region runs, and the releases being
//! prepared.
//!
//! A release goes in two phases. `Prepare` records the candidate images of a commit hash, one per region, protected
//! (the autoscaler never drains their hosts) and inactive (the autoscaler's buffer counts only the active image).
//! `SwapOver` then switches every region the release covers in **one event** of this one aggregate, so no reader can
//! ever see some regions switched and others not, and replaying the log reproduces the switch exactly. `RollBack`
//! abandons a prepared release. The hosts themselves (buffers launched, old hosts drained) are decisions of the
//! instance aggregates, taken by the release workflow and the autoscaler from what this catalog says.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The one catalog's aggregate id.
pub const CATALOG_ID: &str = "catalog";

/// One region's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionImage {
    pub image_id: String,
    pub client_commit_hash: String,
}

/// A release recorded by `Prepare` and not yet swapped over or rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedRelease {
    /// Region → candidate image id.
    pub images: BTreeMap<String, String>,
    /// Which preparation this is (1 for the catalog's first): a release rolled back and prepared again gets a new
    /// one, so the hosts launched for each attempt can be told apart.
    pub generation: u64,
    pub prepared_at: DateTime<Utc>,
}

/// The catalog as the aggregate knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCatalog {
    /// Per region, the active image.
    pub active: BTreeMap<String, RegionImage>,
    /// Commit hash → the release prepared for it.
    pub prepared: BTreeMap<String, PreparedRelease>,
    /// Commit hashes that were active and were replaced by a release (a client on one is out of date).
    pub retired_hashes: BTreeSet<String>,
    /// How many preparations were ever recorded.
    pub preparations: u64,
}

/// Commands the catalog takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageCatalogCommand {
    /// Make these images the active ones, all regions at once, with no preparation (a deployment's first images,
    /// or the simulated image of a local server).
    Activate {
        client_commit_hash: String,
        images: BTreeMap<String, String>,
        at: DateTime<Utc>,
    },
    /// Phase 1 of a release: record its candidate images, protected and inactive. Idempotent for the same images.
    Prepare {
        client_commit_hash: String,
        images: BTreeMap<String, String>,
        at: DateTime<Utc>,
    },
    /// Phase 2: make the prepared release active in every region it covers, at once. Idempotent once done.
    SwapOver {
        client_commit_hash: String,
        /// The regions where a host of the release's image is `ACTIVE` (read by the caller from the fleet).
        ready_regions: BTreeSet<String>,
        at: DateTime<Utc>,
    },
    /// Abandon a prepared release (its images are no longer protected). Idempotent.
    RollBack {
        client_commit_hash: String,
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
    ReleasePrepared {
        client_commit_hash: String,
        images: BTreeMap<String, String>,
        generation: u64,
        at: DateTime<Utc>,
    },
    ReleaseSwappedOver {
        client_commit_hash: String,
        /// Region → the image now active.
        images: BTreeMap<String, String>,
        /// Region → the image it replaced (regions that had one).
        replaced: BTreeMap<String, RegionImage>,
        at: DateTime<Utc>,
    },
    ReleaseRolledBack {
        client_commit_hash: String,
        images: BTreeMap<String, String>,
        at: DateTime<Utc>,
    },
}

crate::stored_events!(
    ImageCatalogEvent,
    "Image",
    [
        ReleaseActivated,
        ReleasePrepared,
        ReleaseSwappedOver,
        ReleaseRolledBack
    ]
);

/// Why the catalog refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageCatalogError {
    #[error("a release must name at least one region")]
    NoRegions,
    #[error("a commit hash is 1 to 64 letters, digits, '.', '_' or '-'; a region name 1 to 32 characters; an image id 1 to 128")]
    Malformed,
    #[error("commit hash {0} is already prepared with other images; roll it back first")]
    PreparedWithOtherImages(String),
    #[error("commit hash {0} is already the active release")]
    AlreadyActive(String),
    #[error("commit hash {0} has no prepared release (run create-buffers first)")]
    NotPrepared(String),
    #[error("no host of the release is ACTIVE yet in: {}", .0.join(", "))]
    BuffersNotReady(Vec<String>),
    #[error("the release does not cover regions that have an active image: {}", .0.join(", "))]
    RegionsLeftBehind(Vec<String>),
    #[error("image {image_id} is another release's (commit hash {client_commit_hash})")]
    ImageTaken {
        image_id: String,
        client_commit_hash: String,
    },
}

/// A commit hash of 1 to 64 letters, digits, `.`, `_` or `-`; region names of 1 to 32 and image ids of 1 to 128
/// printable characters.
fn is_well_formed_release(client_commit_hash: &str, images: &BTreeMap<String, String>) -> bool {
    let printable = |text: &str, longest: usize| {
        !text.is_empty()
            && text.len() <= longest
            && text.chars().all(|character| character.is_ascii_graphic())
    };
    let hash_ok = (1..=64).contains(&client_commit_hash.len())
        && client_commit_hash.chars().all(|character| {
            character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-')
        });
    hash_ok
        && images
            .iter()
            .all(|(region, image_id)| printable(region, 32) && printable(image_id, 128))
}

impl ImageCatalog {
    /// The active image of `region`.
    pub fn active_in(&self, region: &str) -> Option<&RegionImage> {
        self.active.get(region)
    }

    /// Images whose hosts must not be scaled down: every prepared release's.
    pub fn protected_images(&self) -> BTreeSet<String> {
        self.prepared
            .values()
            .flat_map(|release| release.images.values().cloned())
            .collect()
    }

    /// Every region's images whose hosts the catalog keeps, as (region, image id): the region's active image and
    /// every prepared release's image there.
    pub fn kept(&self) -> BTreeSet<(String, String)> {
        let active = self
            .active
            .iter()
            .map(|(region, image)| (region.clone(), image.image_id.clone()));
        let prepared = self.prepared.values().flat_map(|release| {
            release
                .images
                .iter()
                .map(|(region, image_id)| (region.clone(), image_id.clone()))
        });
        active.chain(prepared).collect()
    }

    /// Whether `client_commit_hash` is active or prepared in `region` (a client on it is current).
    pub fn serves(&self, region: &str, client_commit_hash: &str) -> bool {
        self.active
            .get(region)
            .is_some_and(|image| image.client_commit_hash == client_commit_hash)
            || self
                .prepared
                .get(client_commit_hash)
                .is_some_and(|release| release.images.contains_key(region))
    }

    /// Whether the commit hash is active in every region of `images` with exactly those images.
    fn is_active_release(
        &self,
        client_commit_hash: &str,
        images: &BTreeMap<String, String>,
    ) -> bool {
        images.iter().all(|(region, image_id)| {
            self.active.get(region).is_some_and(|active| {
                active.image_id == *image_id && active.client_commit_hash == client_commit_hash
            })
        })
    }

    /// Whether any region runs `client_commit_hash` as its active release.
    fn is_active_anywhere(&self, client_commit_hash: &str) -> bool {
        self.active
            .values()
            .any(|image| image.client_commit_hash == client_commit_hash)
    }

    /// The commit hash an image already belongs to, when it is another one's.
    fn owner_of(&self, image_id: &str, client_commit_hash: &str) -> Option<String> {
        let active = self
            .active
            .values()
            .filter(|image| image.image_id == image_id)
            .map(|image| image.client_commit_hash.clone());
        let prepared = self
            .prepared
            .iter()
            .filter(|(_, release)| release.images.values().any(|image| image == image_id))
            .map(|(hash, _)| hash.clone());
        active
            .chain(prepared)
            .find(|owner| owner != client_commit_hash)
    }

    fn make_active(&mut self, client_commit_hash: &str, images: BTreeMap<String, String>) {
        let mut replaced = BTreeSet::new();
        for (region, image_id) in images {
            let previous = self.active.insert(
                region,
                RegionImage {
                    image_id,
                    client_commit_hash: client_commit_hash.to_string(),
                },
            );
            replaced.extend(previous.map(|previous| previous.client_commit_hash));
        }
        for hash in replaced {
            if !self.is_active_anywhere(&hash) {
                self.retired_hashes.insert(hash);
            }
        }
        self.retired_hashes.remove(client_commit_hash);
    }
}

impl crate::decide::Decide for ImageCatalog {
    type Command = ImageCatalogCommand;
    type Event = ImageCatalogEvent;
    type Error = ImageCatalogError;

    fn decide(
        &self,
        command: ImageCatalogCommand,
    ) -> Result<Vec<ImageCatalogEvent>, ImageCatalogError> {
        if let ImageCatalogCommand::Activate {
            client_commit_hash,
            images,
            ..
        }
        | ImageCatalogCommand::Prepare {
            client_commit_hash,
            images,
            ..
        } = &command
        {
            // What the catalog records stays in the log for ever: nothing unbounded gets in.
            if !is_well_formed_release(client_commit_hash, images) {
                return Err(ImageCatalogError::Malformed);
            }
        }
        match command {
            ImageCatalogCommand::Activate {
                client_commit_hash,
                images,
                at,
            } => {
                if images.is_empty() {
                    return Err(ImageCatalogError::NoRegions);
                }
                if self.is_active_release(&client_commit_hash, &images) {
                    return Ok(vec![]);
                }
                Ok(vec![ImageCatalogEvent::ReleaseActivated {
                    client_commit_hash,
                    images,
                    at,
                }])
            }
            ImageCatalogCommand::Prepare {
                client_commit_hash,
                images,
                at,
            } => {
                if images.is_empty() {
                    return Err(ImageCatalogError::NoRegions);
                }
                if self.is_active_anywhere(&client_commit_hash) {
                    return Err(ImageCatalogError::AlreadyActive(client_commit_hash));
                }
                if let Some(prepared) = self.prepared.get(&client_commit_hash) {
                    return if prepared.images == images {
                        Ok(vec![])
                    } else {
                        Err(ImageCatalogError::PreparedWithOtherImages(
                            client_commit_hash,
                        ))
                    };
                }
                for image_id in images.values() {
                    if let Some(owner) = self.owner_of(image_id, &client_commit_hash) {
                        return Err(ImageCatalogError::ImageTaken {
                            image_id: image_id.clone(),
                            client_commit_hash: owner,
                        });
                    }
                }
                Ok(vec![ImageCatalogEvent::ReleasePrepared {
                    client_commit_hash,
                    images,
                    generation: self.preparations + 1,
                    at,
                }])
            }
            ImageCatalogCommand::SwapOver {
                client_commit_hash,
                ready_regions,
                at,
            } => {
                let Some(prepared) = self.prepared.get(&client_commit_hash) else {
                    return if self.is_active_anywhere(&client_commit_hash) {
                        Ok(vec![])
                    } else {
                        Err(ImageCatalogError::NotPrepared(client_commit_hash))
                    };
                };
                let left_behind: Vec<String> = self
                    .active
                    .keys()
                    .filter(|region| !prepared.images.contains_key(*region))
                    .cloned()
                    .collect();
                if !left_behind.is_empty() {
                    return Err(ImageCatalogError::RegionsLeftBehind(left_behind));
                }
                let not_ready: Vec<String> = prepared
                    .images
                    .keys()
                    .filter(|region| !ready_regions.contains(*region))
                    .cloned()
                    .collect();
                if !not_ready.is_empty() {
                    return Err(ImageCatalogError::BuffersNotReady(not_ready));
                }
                let replaced = prepared
                    .images
                    .keys()
                    .filter_map(|region| {
                        self.active
                            .get(region)
                            .map(|image| (region.clone(), image.clone()))
                    })
                    .collect();
                Ok(vec![ImageCatalogEvent::ReleaseSwappedOver {
                    client_commit_hash,
                    images: prepared.images.clone(),
                    replaced,
                    at,
                }])
            }
            ImageCatalogCommand::RollBack {
                client_commit_hash,
                at,
            } => match self.prepared.get(&client_commit_hash) {
                Some(prepared) => Ok(vec![ImageCatalogEvent::ReleaseRolledBack {
                    client_commit_hash,
                    images: prepared.images.clone(),
                    at,
                }]),
                None if self.is_active_anywhere(&client_commit_hash) => {
                    Err(ImageCatalogError::AlreadyActive(client_commit_hash))
                }
                None => Ok(vec![]),
            },
        }
    }

    fn evolve(&mut self, event: ImageCatalogEvent) {
        match event {
            ImageCatalogEvent::ReleaseActivated {
                client_commit_hash,
                images,
                ..
            } => self.make_active(&client_commit_hash, images),
            ImageCatalogEvent::ReleasePrepared {
                client_commit_hash,
                images,
                generation,
                at,
            } => {
                self.preparations = self.preparations.max(generation);
                self.prepared.insert(
                    client_commit_hash,
                    PreparedRelease {
                        images,
                        generation,
                        prepared_at: at,
                    },
                );
            }
            ImageCatalogEvent::ReleaseSwappedOver {
                client_commit_hash,
                images,
                ..
            } => {
                self.prepared.remove(&client_commit_hash);
                self.make_active(&client_commit_hash, images);
            }
            ImageCatalogEvent::ReleaseRolledBack {
                client_commit_hash, ..
            } => {
                self.prepared.remove(&client_commit_hash);
            }
        }
    }
}

crate::cqrs_aggregate!(ImageCatalog, "image_catalog");

/// Why the hosts of a retired image retire, from the catalog's history (its events in order): for every (region,
/// image id) the catalog kept and keeps no longer, the index in `events` of the event that stopped keeping it (the
/// swap-over that replaced it, the rollback of its release). An image kept again later has no entry. Whoever retires
/// such a host (the release workflow or the autoscaler, whichever comes first) records that event as the cause.
pub fn retirement_causes(
    events: impl IntoIterator<Item = ImageCatalogEvent>,
) -> BTreeMap<(String, String), usize> {
    let mut catalog = ImageCatalog::default();
    let mut causes = BTreeMap::new();
    let mut before = BTreeSet::new();
    for (index, event) in events.into_iter().enumerate() {
        crate::decide::Decide::evolve(&mut catalog, event);
        let after = catalog.kept();
        for stopped in before.difference(&after) {
            causes.insert(stopped.clone(), index);
        }
        for kept in &after {
            causes.remove(kept);
        }
        before = after;
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Decide as _;
    use cqrs_es::test::TestFramework;
    use cqrs_es::Aggregate as _;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    fn images(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(region, image)| (region.to_string(), image.to_string()))
            .collect()
    }

    fn old_release() -> ImageCatalogEvent {
        ImageCatalogEvent::ReleaseActivated {
            client_commit_hash: "old".to_string(),
            images: images(&[("us-east-1", "ami-old-1"), ("eu-west-1", "ami-old-2")]),
            at: at(),
        }
    }

    fn new_images() -> BTreeMap<String, String> {
        images(&[("us-east-1", "ami-new-1"), ("eu-west-1", "ami-new-2")])
    }

    fn prepared(generation: u64) -> ImageCatalogEvent {
        ImageCatalogEvent::ReleasePrepared {
            client_commit_hash: "new".to_string(),
            images: new_images(),
            generation,
            at: at(),
        }
    }

    fn prepare() -> ImageCatalogCommand {
        ImageCatalogCommand::Prepare {
            client_commit_hash: "new".to_string(),
            images: new_images(),
            at: at(),
        }
    }

    #[test]
    fn a_release_with_an_overlong_or_odd_commit_hash_is_refused() {
        for client_commit_hash in [
            "x".repeat(5_000),
            String::new(),
            "a b".to_string(),
            "a\n".to_string(),
        ] {
            TestFramework::<ImageCatalog>::with(())
                .given_no_previous_events()
                .when(ImageCatalogCommand::Prepare {
                    client_commit_hash,
                    images: new_images(),
                    at: at(),
                })
                .then_expect_error(ImageCatalogError::Malformed);
        }
        let mut images = new_images();
        images.insert("r".repeat(33), "ami-1".to_string());
        TestFramework::<ImageCatalog>::with(())
            .given_no_previous_events()
            .when(ImageCatalogCommand::Activate {
                client_commit_hash: "abc123".to_string(),
                images,
                at: at(),
            })
            .then_expect_error(ImageCatalogError::Malformed);
    }

    fn swap_over() -> ImageCatalogCommand {
        ImageCatalogCommand::SwapOver {
            client_commit_hash: "new".to_string(),
            ready_regions: ["us-east-1".to_string(), "eu-west-1".to_string()].into(),
            at: at(),
        }
    }

    fn roll_back() -> ImageCatalogCommand {
        ImageCatalogCommand::RollBack {
            client_commit_hash: "new".to_string(),
            at: at(),
        }
    }

    fn catalog_after(events: Vec<ImageCatalogEvent>) -> ImageCatalog {
        let mut catalog = ImageCatalog::default();
        for event in events {
            catalog.apply(event);
        }
        catalog
    }

    #[test]
    fn a_first_release_switches_every_region_in_one_event() {
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
            .given(vec![old_release()])
            .when(ImageCatalogCommand::Activate {
                client_commit_hash: "old".to_string(),
                images: images(&[("us-east-1", "ami-old-1")]),
                at: at(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_release_without_regions_is_refused() {
        TestFramework::<ImageCatalog>::with(())
            .given_no_previous_events()
            .when(ImageCatalogCommand::Prepare {
                client_commit_hash: "abc".to_string(),
                images: BTreeMap::new(),
                at: at(),
            })
            .then_expect_error(ImageCatalogError::NoRegions);
    }

    #[test]
    fn preparing_a_release_records_its_candidates_with_a_new_generation() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release()])
            .when(prepare())
            .then_expect_events(vec![prepared(1)]);
    }

    #[test]
    fn preparing_the_same_release_again_changes_nothing() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release(), prepared(1)])
            .when(prepare())
            .then_expect_events(vec![]);
    }

    #[test]
    fn preparing_a_prepared_commit_hash_with_other_images_is_refused() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release(), prepared(1)])
            .when(ImageCatalogCommand::Prepare {
                client_commit_hash: "new".to_string(),
                images: images(&[("us-east-1", "ami-other"), ("eu-west-1", "ami-new-2")]),
                at: at(),
            })
            .then_expect_error(ImageCatalogError::PreparedWithOtherImages(
                "new".to_string(),
            ));
    }

    #[test]
    fn preparing_the_active_commit_hash_is_refused() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release()])
            .when(ImageCatalogCommand::Prepare {
                client_commit_hash: "old".to_string(),
                images: new_images(),
                at: at(),
            })
            .then_expect_error(ImageCatalogError::AlreadyActive("old".to_string()));
    }

    #[test]
    fn an_image_of_another_release_cannot_be_prepared() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release()])
            .when(ImageCatalogCommand::Prepare {
                client_commit_hash: "new".to_string(),
                images: images(&[("us-east-1", "ami-old-1"), ("eu-west-1", "ami-new-2")]),
                at: at(),
            })
            .then_expect_error(ImageCatalogError::ImageTaken {
                image_id: "ami-old-1".to_string(),
                client_commit_hash: "old".to_string(),
            });
    }

    #[test]
    fn prepared_images_are_protected_and_inactive_until_the_swap() {
        let catalog = catalog_after(vec![old_release(), prepared(1)]);
        assert_eq!(
            catalog.protected_images(),
            ["ami-new-1", "ami-new-2"]
                .iter()
                .map(|id| id.to_string())
                .collect()
        );
        assert_eq!(
            catalog
                .active_in("us-east-1")
                .map(|image| image.image_id.as_str()),
            Some("ami-old-1")
        );
        assert!(catalog.serves("us-east-1", "new") && catalog.serves("us-east-1", "old"));
    }

    #[test]
    fn swapping_over_switches_every_region_in_one_event_naming_what_it_replaced() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release(), prepared(1)])
            .when(swap_over())
            .then_expect_events(vec![ImageCatalogEvent::ReleaseSwappedOver {
                client_commit_hash: "new".to_string(),
                images: new_images(),
                replaced: [("eu-west-1", "ami-old-2"), ("us-east-1", "ami-old-1")]
                    .iter()
                    .map(|(region, image)| {
                        (
                            region.to_string(),
                            RegionImage {
                                image_id: image.to_string(),
                                client_commit_hash: "old".to_string(),
                            },
                        )
                    })
                    .collect(),
                at: at(),
            }]);
    }

    #[test]
    fn after_the_swap_the_new_images_are_active_unprotected_and_the_old_hash_is_retired() {
        let mut catalog = catalog_after(vec![old_release(), prepared(1)]);
        let events = catalog.decide(swap_over()).expect("the swap is accepted");
        for event in events {
            catalog.apply(event);
        }
        assert!(catalog.protected_images().is_empty());
        assert!(catalog.prepared.is_empty());
        for (region, image) in new_images() {
            assert_eq!(
                catalog.active_in(&region),
                Some(&RegionImage {
                    image_id: image,
                    client_commit_hash: "new".to_string()
                })
            );
        }
        assert!(catalog.retired_hashes.contains("old"));
        assert!(!catalog.serves("us-east-1", "old"));
    }

    #[test]
    fn swapping_over_a_release_already_active_changes_nothing() {
        let swapped = catalog_after(vec![old_release(), prepared(1)])
            .decide(swap_over())
            .expect("the swap is accepted");
        let mut given = vec![old_release(), prepared(1)];
        given.extend(swapped);
        TestFramework::<ImageCatalog>::with(())
            .given(given)
            .when(swap_over())
            .then_expect_events(vec![]);
    }

    #[test]
    fn swapping_over_an_unprepared_release_is_refused() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release()])
            .when(swap_over())
            .then_expect_error(ImageCatalogError::NotPrepared("new".to_string()));
    }

    #[test]
    fn a_release_that_leaves_an_active_region_behind_cannot_be_swapped_over() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![
                old_release(),
                ImageCatalogEvent::ReleasePrepared {
                    client_commit_hash: "new".to_string(),
                    images: images(&[("us-east-1", "ami-new-1")]),
                    generation: 1,
                    at: at(),
                },
            ])
            .when(swap_over())
            .then_expect_error(ImageCatalogError::RegionsLeftBehind(vec![
                "eu-west-1".to_string()
            ]));
    }

    #[test]
    fn a_release_without_an_active_host_in_every_region_cannot_be_swapped_over() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release(), prepared(1)])
            .when(ImageCatalogCommand::SwapOver {
                client_commit_hash: "new".to_string(),
                ready_regions: ["us-east-1".to_string()].into(),
                at: at(),
            })
            .then_expect_error(ImageCatalogError::BuffersNotReady(vec![
                "eu-west-1".to_string()
            ]));
    }

    #[test]
    fn rolling_back_a_prepared_release_records_its_images() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release(), prepared(1)])
            .when(roll_back())
            .then_expect_events(vec![ImageCatalogEvent::ReleaseRolledBack {
                client_commit_hash: "new".to_string(),
                images: new_images(),
                at: at(),
            }]);
    }

    #[test]
    fn a_rolled_back_release_is_unprotected_and_the_old_release_still_active() {
        let catalog = catalog_after(vec![
            old_release(),
            prepared(1),
            ImageCatalogEvent::ReleaseRolledBack {
                client_commit_hash: "new".to_string(),
                images: new_images(),
                at: at(),
            },
        ]);
        assert!(catalog.protected_images().is_empty());
        assert!(!catalog.serves("us-east-1", "new"));
        assert!(catalog.serves("us-east-1", "old"));
    }

    #[test]
    fn rolling_back_the_active_release_is_refused() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release()])
            .when(ImageCatalogCommand::RollBack {
                client_commit_hash: "old".to_string(),
                at: at(),
            })
            .then_expect_error(ImageCatalogError::AlreadyActive("old".to_string()));
    }

    #[test]
    fn rolling_back_an_unknown_release_changes_nothing() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![old_release()])
            .when(roll_back())
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_release_prepared_again_after_a_rollback_gets_a_new_generation() {
        TestFramework::<ImageCatalog>::with(())
            .given(vec![
                old_release(),
                prepared(1),
                ImageCatalogEvent::ReleaseRolledBack {
                    client_commit_hash: "new".to_string(),
                    images: new_images(),
                    at: at(),
                },
            ])
            .when(prepare())
            .then_expect_events(vec![prepared(2)]);
    }

    fn swapped_over() -> ImageCatalogEvent {
        ImageCatalogEvent::ReleaseSwappedOver {
            client_commit_hash: "new".to_string(),
            images: new_images(),
            replaced: [
                ("eu-west-1", "ami-old-2", "old"),
                ("us-east-1", "ami-old-1", "old"),
            ]
            .into_iter()
            .map(|(region, image_id, hash)| {
                (
                    region.to_string(),
                    RegionImage {
                        image_id: image_id.to_string(),
                        client_commit_hash: hash.to_string(),
                    },
                )
            })
            .collect(),
            at: at(),
        }
    }

    fn rolled_back() -> ImageCatalogEvent {
        ImageCatalogEvent::ReleaseRolledBack {
            client_commit_hash: "new".to_string(),
            images: new_images(),
            at: at(),
        }
    }

    fn key(region: &str, image_id: &str) -> (String, String) {
        (region.to_string(), image_id.to_string())
    }

    #[test]
    fn the_swap_over_is_why_the_images_it_replaced_retire() {
        let causes = retirement_causes(vec![old_release(), prepared(1), swapped_over()]);
        assert_eq!(
            causes,
            [
                (key("eu-west-1", "ami-old-2"), 2),
                (key("us-east-1", "ami-old-1"), 2)
            ]
            .into()
        );
    }

    #[test]
    fn the_rollback_is_why_a_release_candidates_retire_until_they_are_prepared_again() {
        let rolled = vec![old_release(), prepared(1), rolled_back()];
        assert_eq!(
            retirement_causes(rolled.clone()),
            [
                (key("eu-west-1", "ami-new-2"), 2),
                (key("us-east-1", "ami-new-1"), 2)
            ]
            .into()
        );
        let mut again = rolled;
        again.push(prepared(2));
        assert_eq!(retirement_causes(again.clone()), BTreeMap::new());
        again.push(swapped_over());
        assert_eq!(
            retirement_causes(again).keys().collect::<Vec<_>>(),
            [
                &key("eu-west-1", "ami-old-2"),
                &key("us-east-1", "ami-old-1")
            ]
        );
    }
}
