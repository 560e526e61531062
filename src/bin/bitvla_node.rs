//! `bitvla_node`: the ROS 2 node (build with `--features ros` in a ROS 2 environment; see
//! `scripts/setup_ros.sh`). Parameters: `--ros-args --params-file config/….yaml -p model_path:=…`.

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    bitvla_ros::process::tune_malloc();
    if let Err(e) = bitvla_ros::ros::run_node() {
        eprintln!("bitvla_node: {e:#}");
        std::process::exit(1);
    }
}
