"""bitvla_node on a real arm (MoveIt Servo twist commands). Safe by default: dry_run is true.

    ros2 launch bitvla_ros bitvla_real.launch.py model_path:=/models/libero_spatial.bitvla \
        camera_topic:=/camera/color/image_raw dry_run:=false

Arguments:
    model_path     checkpoint directory or packed .bitvla file (required)
    config         parameter file (default: the package's config/real_arm.yaml)
    camera_topic   third-person camera (sensor_msgs/Image)
    wrist_camera_topic  wrist camera (sensor_msgs/CompressedImage)
    command_topic  MoveIt Servo twist input
    use_sim_time   false: wall clock on a real robot
    dry_run        true: publish only on ~/dry_run/command
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description():
    share = get_package_share_directory("bitvla_ros")
    arg = LaunchConfiguration
    return LaunchDescription([
        DeclareLaunchArgument("model_path", description="checkpoint directory or .bitvla file"),
        DeclareLaunchArgument("config", default_value=os.path.join(share, "config", "real_arm.yaml")),
        DeclareLaunchArgument("camera_topic", default_value="/camera/color/image_raw"),
        DeclareLaunchArgument("wrist_camera_topic", default_value="/wrist_camera/color/image_raw/compressed"),
        DeclareLaunchArgument("command_topic", default_value="/servo_node/delta_twist_cmds"),
        DeclareLaunchArgument("dry_run", default_value="true"),
        DeclareLaunchArgument("use_sim_time", default_value="false"),
        Node(
            package="bitvla_ros",
            executable="bitvla_node",
            name="bitvla_node",
            output="screen",
            parameters=[
                arg("config"),
                {
                    "model_path": arg("model_path"),
                    "camera_topic": arg("camera_topic"),
                    "wrist_camera_topic": arg("wrist_camera_topic"),
                    "command_topic": arg("command_topic"),
                    "dry_run": ParameterValue(arg("dry_run"), value_type=bool),
                    "use_sim_time": ParameterValue(arg("use_sim_time"), value_type=bool),
                },
            ],
        ),
    ])
