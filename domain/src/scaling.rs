//! The autoscaler's policy for one region, as a pure function of the fleet it reads and its settings: how many hosts
//! to launch and which hosts to drain. The autoscaler (in `api/`) reads the fleet, calls this, and records the
//! decisions as instance commands; the instance aggregate re-checks each one (a host drained for scaling down must
//! still be empty), so a stale read can cost a refused command, never a wrong drain.
//!
//! The rules:
//! - Free capacity counts only hosts of the region's active image: an `ACTIVE` host's free slots, and a host still
//!   booting (`PRE_CONNECTION`) as `expected_capacity` (it reports its real capacity when it registers).
//! - Below the target, launch `ceil(missing / expected_capacity)` hosts, and drain nothing.
//! - Hosts on an image that is neither the active one nor protected (a release replaced it, or its release was
//!   rolled back) are retired whatever their fill: a registered one is drained (it takes no new mandelbox and shuts
//!   down when its last one ends), one still booting is terminated. A silent host is left to the sweeper.
//! - Otherwise (at or above the target) drain empty `ACTIVE` hosts of the active image one at a time while the free
//!   capacity on `ACTIVE` hosts left after draining the host is still at least the target, i.e. while it is at least
//!   the target plus that host. Capacity still booting does not permit a drain: it cannot take a mandelbox yet, and
//!   draining the host that can would leave assigns with nowhere to go until the new one registers. That is the hysteresis: a launch leaves less than one host of capacity above the target,
//!   so nothing launched is drained until disconnects free a whole host beyond it, and nothing drained brings free
//!   capacity back under the target.

use std::collections::BTreeSet;

use crate::instance::InstanceStatus;

/// One host of the region, as the autoscaler reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub instance_id: String,
    pub image_id: String,
    pub status: InstanceStatus,
    /// The capacity the host reported (0 until it registers).
    pub capacity: u32,
    pub live: u32,
}

/// What the region needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionPlan {
    /// Free slots on the active image, counting hosts still booting.
    pub free: u32,
    pub desired: u32,
    /// Hosts to launch on the active image.
    pub launch: u32,
    /// Empty hosts of the active image to drain, in order.
    pub drain: Vec<String>,
    /// Hosts on retired images: registered ones to drain, booting ones to terminate.
    pub retire: Vec<Retirement>,
}

/// A host on a retired image, and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retirement {
    pub instance_id: String,
    /// The retired image it runs: the catalog event that retired the image is why the host retires.
    pub image_id: String,
    pub step: RetirementStep,
}

/// How a host retires: a registered one drains, one still booting is terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetirementStep {
    Drain,
    Terminate,
}

impl Retirement {
    pub fn new(instance_id: &str, image_id: &str, step: RetirementStep) -> Self {
        Self {
            instance_id: instance_id.to_string(),
            image_id: image_id.to_string(),
            step,
        }
    }
}

/// Hosts of the region on an image that is neither `active_image` nor protected, that are still up or coming up.
pub fn retirements(
    hosts: &[HostView],
    active_image: &str,
    protected_images: &BTreeSet<String>,
) -> Vec<Retirement> {
    hosts
        .iter()
        .filter(|host| host.image_id != active_image && !protected_images.contains(&host.image_id))
        .filter_map(|host| {
            match host.status {
                InstanceStatus::Active => Some(RetirementStep::Drain),
                InstanceStatus::PreConnection => Some(RetirementStep::Terminate),
                _ => None,
            }
            .map(|step| Retirement::new(&host.instance_id, &host.image_id, step))
        })
        .collect()
}

/// The settings the policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets<'a> {
    pub active_image: &'a str,
    pub protected_images: &'a BTreeSet<String>,
    pub desired_free: u32,
    pub expected_capacity: u32,
}

/// The plan for one region.
pub fn plan_region(hosts: &[HostView], targets: Targets<'_>) -> RegionPlan {
    let expected = targets.expected_capacity.max(1);
    let on_active = |host: &&HostView| host.image_id == targets.active_image;
    let mut free: u32 = 0;
    let mut free_now: u32 = 0;
    for host in hosts.iter().filter(on_active) {
        match host.status {
            InstanceStatus::PreConnection => free = free.saturating_add(expected),
            InstanceStatus::Active => {
                let slots = host.capacity.saturating_sub(host.live);
                free = free.saturating_add(slots);
                free_now = free_now.saturating_add(slots);
            }
            _ => {}
        }
    }
    let mut plan = RegionPlan {
        free,
        desired: targets.desired_free,
        retire: retirements(hosts, targets.active_image, targets.protected_images),
        ..RegionPlan::default()
    };
    if free < targets.desired_free {
        plan.launch = (targets.desired_free - free).div_ceil(expected);
        return plan;
    }
    let drainable = |host: &&HostView| {
        host.status == InstanceStatus::Active
            && host.live == 0
            && !targets.protected_images.contains(&host.image_id)
    };
    // What registered hosts can take now: only that may be drained down to the target.
    let mut left = free_now;
    let mut empty_on_active: Vec<&HostView> =
        hosts.iter().filter(drainable).filter(on_active).collect();
    // The smallest hosts first (they free the least); ties by id, so the plan is reproducible.
    empty_on_active.sort_by(|a, b| {
        a.capacity
            .cmp(&b.capacity)
            .then_with(|| a.instance_id.cmp(&b.instance_id))
    });
    for host in empty_on_active {
        if left.saturating_sub(host.capacity) < targets.desired_free || host.capacity > left {
            break;
        }
        left -= host.capacity;
        plan.drain.push(host.instance_id.clone());
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(id: &str, image: &str, status: InstanceStatus, capacity: u32, live: u32) -> HostView {
        HostView {
            instance_id: id.to_string(),
            image_id: image.to_string(),
            status,
            capacity,
            live,
        }
    }

    fn targets(desired: u32, protected: &BTreeSet<String>) -> Targets<'_> {
        Targets {
            active_image: "ami-new",
            protected_images: protected,
            desired_free: desired,
            expected_capacity: 4,
        }
    }

    #[test]
    fn an_empty_region_launches_enough_hosts_for_its_buffer() {
        let none = BTreeSet::new();
        let plan = plan_region(&[], targets(10, &none));
        assert_eq!((plan.free, plan.launch), (0, 3));
        assert!(plan.drain.is_empty());
    }

    #[test]
    fn hosts_still_booting_count_as_their_expected_capacity() {
        let none = BTreeSet::new();
        let hosts = [host("a", "ami-new", InstanceStatus::PreConnection, 0, 0)];
        let plan = plan_region(&hosts, targets(4, &none));
        assert_eq!((plan.free, plan.launch), (4, 0));
    }

    #[test]
    fn hosts_on_another_image_or_not_taking_mandelboxes_do_not_count() {
        let none = BTreeSet::new();
        let hosts = [
            host("old", "ami-old", InstanceStatus::Active, 4, 1),
            host("draining", "ami-new", InstanceStatus::Draining, 4, 0),
            host("silent", "ami-new", InstanceStatus::Unresponsive, 4, 0),
        ];
        let plan = plan_region(&hosts, targets(2, &none));
        assert_eq!((plan.free, plan.launch), (0, 1));
    }

    #[test]
    fn a_region_at_its_target_changes_nothing() {
        let none = BTreeSet::new();
        let hosts = [host("a", "ami-new", InstanceStatus::Active, 4, 2)];
        assert_eq!(
            plan_region(&hosts, targets(2, &none)),
            RegionPlan {
                free: 2,
                desired: 2,
                launch: 0,
                drain: vec![],
                retire: vec![],
            }
        );
    }

    #[test]
    fn an_empty_host_is_drained_only_while_the_buffer_stays_met_without_it() {
        let none = BTreeSet::new();
        // 8 free for a target of 2: one empty host can go (4 left), the second cannot (0 < 2).
        let hosts = [
            host("a", "ami-new", InstanceStatus::Active, 4, 0),
            host("b", "ami-new", InstanceStatus::Active, 4, 0),
        ];
        assert_eq!(plan_region(&hosts, targets(2, &none)).drain, vec!["a"]);
        // 7 free for a target of 4: draining the empty host would leave 3.
        let hosts = [
            host("a", "ami-new", InstanceStatus::Active, 4, 0),
            host("b", "ami-new", InstanceStatus::Active, 4, 1),
        ];
        assert!(plan_region(&hosts, targets(4, &none)).drain.is_empty());
    }

    #[test]
    fn capacity_still_booting_never_permits_draining_the_host_that_can_take_mandelboxes_now() {
        let none = BTreeSet::new();
        // 8 free on paper for a target of 4, but 4 of them are still booting: "a" is all there is to assign on.
        let hosts = [
            host("a", "ami-new", InstanceStatus::Active, 4, 0),
            host("b", "ami-new", InstanceStatus::PreConnection, 0, 0),
        ];
        let plan = plan_region(&hosts, targets(4, &none));
        assert_eq!((plan.free, plan.launch), (8, 0));
        assert!(plan.drain.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_host_with_a_mandelbox_is_never_drained_to_scale_down() {
        let none = BTreeSet::new();
        let hosts = [
            host("a", "ami-new", InstanceStatus::Active, 4, 1),
            host("b", "ami-new", InstanceStatus::Active, 4, 1),
        ];
        assert!(plan_region(&hosts, targets(0, &none)).drain.is_empty());
    }

    #[test]
    fn hosts_on_retired_images_are_retired_whatever_their_fill_and_protected_images_stay() {
        let protected: BTreeSet<String> = ["ami-candidate".to_string()].into();
        let hosts = [
            host("new", "ami-new", InstanceStatus::Active, 4, 0),
            host("old", "ami-old", InstanceStatus::Active, 4, 0),
            host("candidate", "ami-candidate", InstanceStatus::Active, 4, 0),
            host("old-busy", "ami-old", InstanceStatus::Active, 4, 2),
            host(
                "old-booting",
                "ami-old",
                InstanceStatus::PreConnection,
                0,
                0,
            ),
            host("old-silent", "ami-old", InstanceStatus::Unresponsive, 4, 1),
            host("old-draining", "ami-old", InstanceStatus::Draining, 4, 1),
        ];
        let plan = plan_region(&hosts, targets(4, &protected));
        assert!(plan.drain.is_empty());
        assert_eq!(
            plan.retire,
            vec![
                Retirement::new("old", "ami-old", RetirementStep::Drain),
                Retirement::new("old-busy", "ami-old", RetirementStep::Drain),
                Retirement::new("old-booting", "ami-old", RetirementStep::Terminate),
            ]
        );
    }

    #[test]
    fn a_region_below_its_target_still_retires_its_old_hosts() {
        let none = BTreeSet::new();
        let hosts = [host("old", "ami-old", InstanceStatus::Active, 4, 1)];
        let plan = plan_region(&hosts, targets(4, &none));
        assert_eq!(plan.launch, 1);
        assert_eq!(
            plan.retire,
            vec![Retirement::new("old", "ami-old", RetirementStep::Drain)]
        );
    }

    fn any_host() -> impl Strategy<Value = HostView> {
        (
            Just(0u32),
            prop_oneof![Just("ami-new"), Just("ami-old")],
            prop_oneof![
                Just(InstanceStatus::PreConnection),
                Just(InstanceStatus::Active),
                Just(InstanceStatus::Draining),
            ],
            1u32..6,
            0u32..6,
        )
            .prop_map(|(id, image, status, capacity, live)| HostView {
                instance_id: format!("h{id}"),
                image_id: image.to_string(),
                status,
                capacity: if status == InstanceStatus::PreConnection {
                    0
                } else {
                    capacity
                },
                live: if status == InstanceStatus::PreConnection {
                    0
                } else {
                    live.min(capacity)
                },
            })
    }

    proptest! {
        #[test]
        fn the_plan_never_launches_and_drains_at_once_nor_leaves_the_buffer_unmet(
            hosts in proptest::collection::vec(any_host(), 0..40),
            desired in 0u32..30,
        ) {
            let hosts: Vec<HostView> = hosts
                .into_iter()
                .enumerate()
                .map(|(index, host)| HostView { instance_id: format!("h{index}"), ..host })
                .collect();
            let none = BTreeSet::new();
            let plan = plan_region(&hosts, targets(desired, &none));
            prop_assert!(plan.launch == 0 || plan.drain.is_empty());
            // After the plan: the buffer is met, and a host's worth of capacity more would not be drained again.
            let drained: BTreeSet<&String> = plan.drain.iter().collect();
            let free_after: u32 = hosts
                .iter()
                .filter(|host| host.image_id == "ami-new" && !drained.contains(&host.instance_id))
                .map(|host| match host.status {
                    InstanceStatus::PreConnection => 4,
                    InstanceStatus::Active => host.capacity - host.live,
                    _ => 0,
                })
                .sum::<u32>()
                + plan.launch * 4;
            prop_assert!(free_after >= desired);
            // A drain never leaves less than the target on hosts that can take a mandelbox now.
            if !plan.drain.is_empty() {
                let free_now_after: u32 = hosts
                    .iter()
                    .filter(|host| host.image_id == "ami-new" && !drained.contains(&host.instance_id))
                    .filter(|host| host.status == InstanceStatus::Active)
                    .map(|host| host.capacity - host.live)
                    .sum();
                prop_assert!(free_now_after >= desired);
            }
            // Launching never overshoots by a whole host: the next plan drains nothing it launched.
            if plan.launch > 0 {
                prop_assert!(free_after < desired + 4);
            }
            for id in &plan.drain {
                let host = hosts.iter().find(|host| &host.instance_id == id).expect("a drained host exists");
                prop_assert_eq!(host.live, 0);
                prop_assert_eq!(host.status, InstanceStatus::Active);
            }
        }
    }
}
