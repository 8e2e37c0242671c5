//! The EC2 adapter against moto's server on loopback, in two regions.

use whist_adapters::ec2::{Ec2Error, LaunchRequest};
use whist_tests::Moto;

fn launch(region: &str) -> LaunchRequest {
    let launch_id = uuid::Uuid::new_v4().to_string();
    LaunchRequest {
        user_data: format!("WHIST_INSTANCE_ID={launch_id}\nWHIST_BOOTSTRAP_TOKEN=secret\n"),
        launch_id,
        region: region.to_string(),
        image_id: "ami-12c6146b".to_string(),
        instance_type: "g4dn.2xlarge".to_string(),
    }
}

#[tokio::test]
async fn launches_are_tagged_listed_per_region_and_terminated() {
    let moto = Moto::start().await;
    let ec2 = moto.ec2("test-deployment");
    let east = launch("us-east-1");
    let west = launch("us-west-1");
    let launched_east = ec2.launch(&east).await.expect("launches in us-east-1");
    let launched_west = ec2.launch(&west).await.expect("launches in us-west-1");
    assert!(launched_east.cloud_instance_id.starts_with("i-"));

    let listed = ec2.list("us-east-1").await.expect("lists");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0].launch_id.as_deref(),
        Some(east.launch_id.as_str())
    );
    assert_eq!(ec2.list("us-west-1").await.expect("lists").len(), 1);
    // Another deployment's instances are not ours.
    let other = moto.ec2("other-deployment");
    assert!(other.list("us-east-1").await.expect("lists").is_empty());

    ec2.terminate(
        "us-east-1",
        std::slice::from_ref(&launched_east.cloud_instance_id),
    )
    .await
    .expect("terminates");
    ec2.terminate(
        "us-east-1",
        std::slice::from_ref(&launched_east.cloud_instance_id),
    )
    .await
    .expect("terminating twice is fine");
    assert!(ec2
        .find_launch("us-east-1", &east.launch_id)
        .await
        .expect("asks")
        .is_none());
    assert!(ec2
        .find_launch("us-west-1", &west.launch_id)
        .await
        .expect("asks")
        .is_some_and(|instance| instance.cloud_instance_id == launched_west.cloud_instance_id));
}

#[tokio::test]
async fn a_retried_launch_adopts_the_instance_instead_of_starting_a_second() {
    let moto = Moto::start().await;
    let ec2 = moto.ec2("test-deployment");
    let request = launch("us-east-1");
    let first = ec2.launch(&request).await.expect("launches");
    let again = ec2.launch(&request).await.expect("the retry answers");
    assert_eq!(first.cloud_instance_id, again.cloud_instance_id);
    let live: Vec<_> = ec2
        .list("us-east-1")
        .await
        .expect("lists")
        .into_iter()
        .filter(|instance| instance.is_live())
        .collect();
    assert_eq!(live.len(), 1, "exactly one instance per launch decision");
}

#[tokio::test]
async fn a_refused_launch_is_final_and_an_unreachable_ec2_is_worth_retrying() {
    let moto = Moto::start().await;
    let ec2 = moto.ec2("test-deployment");
    let mut bad = launch("us-east-1");
    bad.instance_type = "no-such-type.huge".to_string();
    match ec2.launch(&bad).await {
        Err(Ec2Error::Refused(_)) => {}
        other => panic!("an unknown instance type is refused for good: {other:?}"),
    }
    assert!(ec2.list("us-east-1").await.expect("lists").is_empty());
    let port = whist_tests::free_port();
    let nowhere = whist_adapters::ec2::Ec2::new(
        "test-deployment",
        whist_adapters::ec2::Ec2Access {
            endpoint_url: Some(format!("http://127.0.0.1:{port}")),
            static_credentials: Some(("testing".to_string(), "testing".to_string())),
        },
    );
    assert!(matches!(
        nowhere.launch(&launch("us-east-1")).await,
        Err(Ec2Error::Retryable(_))
    ));
}

async fn app_on_moto(database: &whist_tests::TestDatabase, moto: &Moto) -> whist_tests::TestApp {
    let mut settings = database.settings();
    settings.aws.endpoint_url = Some(moto.endpoint.clone());
    whist_tests::spawn_app_with(database, settings).await
}

/// The cloud instance id each launch recorded, once all have one.
async fn recorded_launches(app: &whist_tests::TestApp, ids: &[String]) -> Vec<String> {
    let mut recorded = Vec::new();
    let started = std::time::Instant::now();
    for id in ids {
        loop {
            let (instance, _) = app
                .state
                .services
                .instances
                .load_from_history(id)
                .await
                .expect("loads");
            if let Some(cloud_instance_id) = instance.cloud_instance_id {
                recorded.push(cloud_instance_id);
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "launch {id} was not recorded"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    recorded
}

#[tokio::test]
async fn the_reconciler_launches_each_decision_once_in_its_region_even_with_two_processes() {
    let moto = Moto::start().await;
    let database = whist_tests::TestDatabase::postgres().await;
    let first = app_on_moto(&database, &moto).await;
    let second = app_on_moto(&database, &moto).await;
    let mut ids = Vec::new();
    for index in 0..6 {
        let region = if index % 2 == 0 {
            "us-east-1"
        } else {
            "us-west-1"
        };
        let app = if index % 3 == 0 { &first } else { &second };
        let (id, _) = app
            .launch(whist_tests::launch_spec(region, "ami-12c6146b", "hash-a"))
            .await;
        ids.push(id);
    }
    let recorded = recorded_launches(&first, &ids).await;
    let ec2 = moto.ec2("whist-test");
    let mut in_cloud = Vec::new();
    for region in ["us-east-1", "us-west-1"] {
        in_cloud.extend(
            ec2.list(region)
                .await
                .expect("lists")
                .into_iter()
                .filter(|instance| instance.is_live()),
        );
    }
    assert_eq!(
        in_cloud.len(),
        ids.len(),
        "one instance per decision: {in_cloud:?}"
    );
    for (id, cloud_instance_id) in ids.iter().zip(&recorded) {
        let matching: Vec<_> = in_cloud
            .iter()
            .filter(|instance| instance.launch_id.as_deref() == Some(id.as_str()))
            .collect();
        assert_eq!(matching.len(), 1, "launch {id}");
        assert_eq!(&matching[0].cloud_instance_id, cloud_instance_id);
    }
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn every_launch_requires_imdsv2_session_tokens() {
    let moto = Moto::start().await;
    let ec2 = moto.ec2("test-deployment");
    let launched = ec2.launch(&launch("us-east-1")).await.expect("launches");
    // Asked of EC2 (moto) directly, not through the adapter under test.
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(&moto.endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .build();
    let described = aws_sdk_ec2::Client::from_conf(config)
        .describe_instances()
        .instance_ids(&launched.cloud_instance_id)
        .send()
        .await
        .expect("EC2 describes the instance");
    let instance = described
        .reservations()
        .iter()
        .flat_map(|reservation| reservation.instances())
        .next()
        .expect("the instance is listed");
    let options = instance
        .metadata_options()
        .expect("metadata options are reported");
    assert_eq!(
        options.http_tokens(),
        Some(&aws_sdk_ec2::types::HttpTokensState::Required),
        "IMDSv1 (no session token) must be off: {options:?}"
    );
}
